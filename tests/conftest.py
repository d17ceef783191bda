"""Suite-wide collection order: the slowest files first. `make test` runs files in parallel (pytest-xdist,
one file per worker, handed out in collection order), so a long file that starts last leaves one worker
busy alone at the end; started first, the short files fill in around it. Relative order otherwise kept."""

from __future__ import annotations

# Measured on a quiet 2-core machine, longest first (seconds of one worker, in a serial run).
SLOWEST_FIRST = (
    "tests/fuzz/test_fuzz_rpcs.py",  # ~270
    "tests/faults/test_two_rankers_postgres.py",  # ~220
    "tests/test_runlocal.py",  # ~190
    "tests/faults/test_ranker_corrupt_state.py",  # ~150
    "tests/rollout/test_rollout.py",  # ~100
    "tests/e2e/test_added_anime.py",  # ~90 (and the worker's e2e bundle)
    "tests/faults/test_crash_drill.py",  # ~80
    "tests/test_cli.py",  # ~70
    "tests/models/test_behaviour.py",  # ~60
)


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(str(item.path.relative_to(root)), len(rank)))  # stable sort

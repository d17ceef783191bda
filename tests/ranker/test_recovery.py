"""The pieces of the ranker's start-up recovery and id policy, in-process and fast (the ranker
process itself recovering is tests/faults/test_ranker_corrupt_state.py):
- the alias record: garbage and non-version contents are AliasUnreadable, never a bare traceback;
  `anime2vec promote` rewrites a damaged one, rollback refuses with a clear error;
- the shard check: sound shards pass; truncated, aborting and silently-short ones do not, and a
  shard another process holds is "in use", never "damaged";
- quarantine moves an SQLite file together with its -wal / -shm, and open_store replaces an
  unreadable store with an empty one, keeping the old file;
- new ids: in the assigned range, past bundle ids there, undisturbed by out-of-range ids.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from anime2vec.feedback import FeedbackStore
from anime2vec.index.base import AliasUnreadable, ItemPoint
from anime2vec.index.edge import EdgeItemIndex
from anime2vec.rollout import FileAliasHistory, Rollout, RolloutError
from anime2vec.store.added_anime import ASSIGNED_IDS, MAX_ANIME_ID, AddedAnimeStore, IdsExhausted
from services.ranker.recovery import StoreUnavailable, open_store, quarantine, recover_alias, recover_collections

DIM = 8
GARBAGE = b"\x00\xff garbage \x13" * 100


def build(root: Path, version: str = "v1", n: int = 300) -> EdgeItemIndex:
    rng = np.random.default_rng(0)
    index = EdgeItemIndex(root)
    index.create_version(
        version,
        DIM,
        (ItemPoint(i + 1, rng.standard_normal(DIM), {"title": f"t{i}", "genres": ["A"]}) for i in range(n)),
    )
    index.set_alias(version)
    # an added anime, as the ranker replays them: the flush moves the engine's WAL past the build,
    # so on reopening the sealed segment's files alone say which points exist
    index.upsert([ItemPoint(n + 1000, rng.standard_normal(DIM), {"title": "added"})], version=version)
    return index


@pytest.fixture
def built(tmp_path) -> Path:
    """A closed embedded index with version v1 behind the alias; its root."""
    build(tmp_path / "qdrant").close()
    return tmp_path / "qdrant"


@pytest.mark.parametrize(
    "content",
    [GARBAGE, b'{"anime2vec_items": "../../etc"}', b'["v1"]', b'"v1"', b'{"anime2vec_items": 7}', b"\xff\xfe"],
)
def test_a_damaged_alias_record_is_alias_unreadable(built, content):
    (built / "aliases.json").write_bytes(content)
    index = EdgeItemIndex(built)
    with pytest.raises(AliasUnreadable):
        index.alias_target()


def test_an_empty_alias_record_is_an_unset_alias(built):
    (built / "aliases.json").write_text("{}")
    assert EdgeItemIndex(built).alias_target() is None


def test_recover_alias_moves_a_damaged_one_aside_and_the_alias_is_unset(built, caplog):
    (built / "aliases.json").write_bytes(GARBAGE)
    index = EdgeItemIndex(built)
    with caplog.at_level(logging.ERROR):
        recover_alias(index, built.parent)
    assert index.alias_target() is None
    (moved,) = (built.parent / "quarantine").rglob("aliases.json")
    assert moved.read_bytes() == GARBAGE
    (line,) = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith(f"the collection alias is unreadable ({built / 'aliases.json'} is not readable JSON")
    assert line.endswith(
        f"moved to {moved}; serving the configured bundle or the newest bundle that verifies, "
        "and pointing the alias at it"
    )


def test_promote_rewrites_a_damaged_alias_and_rollback_refuses_clearly(built, tmp_path, monkeypatch):
    (built / "aliases.json").write_bytes(GARBAGE)
    (built / "alias_history.json").write_bytes(GARBAGE)
    rollout = Rollout(
        EdgeItemIndex(built), FileAliasHistory(built / "alias_history.json"), tmp_path / "models", str(built)
    )
    monkeypatch.setattr(rollout, "_check_promotable", lambda version: None)  # no bundle store here
    with pytest.raises(RolloutError, match="nothing to roll back from"):
        rollout.rollback()
    assert [row.live for row in rollout.versions()] == [False]
    assert rollout.promote("v1") == (None, "v1")
    assert rollout.index.alias_target() == "v1"
    assert FileAliasHistory(built / "alias_history.json").previous("v1") == []


def test_a_sound_collection_passes_the_check(built):
    index = EdgeItemIndex(built)
    assert index.check_stored_version("v1").sound and index.check_stored_users("v1").sound  # no users yet: sound


def halve(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda shard: [halve(p) for p in (shard / "segments").rglob("status.dat")], "does not open: PanicException"),
        (lambda shard: [halve(p) for p in (shard / "segments").rglob("id_tracker.versions")], "were written"),
        (
            lambda shard: [
                p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:])
                for p in (shard / "segments").rglob("id_tracker.mappings")
            ],
            "crashed reading it (SIGABRT)",
        ),
        (lambda shard: (shard.parent / "meta.json").unlink(), "meta.json is missing"),
        (lambda shard: (shard.parent / "meta.json").write_bytes(GARBAGE), "meta.json is unreadable"),
    ],
)
def test_a_damaged_collection_fails_the_check_without_harming_this_process(built, damage, problem):
    damage(built / "versions" / "v1" / "shard")
    health = EdgeItemIndex(built).check_stored_version("v1")
    assert not health.sound and problem in health.problem, health


def test_a_collection_held_by_another_process_is_in_use_not_damaged(built, tmp_path):
    holder = EdgeItemIndex(built)
    holder.count("v1")  # opens (and locks) the shard
    try:
        health = EdgeItemIndex(built).check_stored_version("v1")
        assert health.in_use and health.problem is None
    finally:
        holder.close()


def test_recover_collections_quarantines_a_damaged_version_so_it_can_be_rebuilt(built, caplog):
    for p in (built / "versions" / "v1" / "shard" / "segments").rglob("*.dat"):
        halve(p)
    index = EdgeItemIndex(built)
    with caplog.at_level(logging.ERROR):
        recover_collections(index, "v1", built.parent)
    assert not index.has_version("v1")
    (moved,) = (built.parent / "quarantine").glob("*/qdrant/versions/v1")
    (line,) = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith("the Qdrant collection of v1 is damaged (") and f"moved to {moved}; rebuilding" in line
    rng = np.random.default_rng(1)
    index.create_version("v1", DIM, (ItemPoint(i + 1, rng.standard_normal(DIM), {}) for i in range(10)))
    assert index.count("v1") == 10
    index.close()


@pytest.mark.parametrize("store, name", [(AddedAnimeStore, "added_anime.sqlite"), (FeedbackStore, "feedback.sqlite")])
def test_an_unreadable_store_is_kept_aside_and_replaced_by_an_empty_one(tmp_path, caplog, store, name):
    path = tmp_path / name
    path.write_bytes(GARBAGE)
    path.with_name(name + "-wal").write_bytes(b"wal")
    with caplog.at_level(logging.ERROR):
        opened = open_store(store, path, tmp_path, "the store")
    opened.close()
    (moved,) = (tmp_path / "quarantine").rglob(name)
    assert moved.read_bytes() == GARBAGE and moved.with_name(name + "-wal").read_bytes() == b"wal"
    (line,) = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert f"moved to {moved} and kept, NOT deleted" in line and "EMPTY" in line


@pytest.mark.parametrize("store", [AddedAnimeStore, FeedbackStore])
def test_a_store_that_cannot_be_opened_is_left_alone(tmp_path, store):
    """SQLite's OperationalError (here: the path is a directory; also a lock held by another
    replica, an I/O error) says nothing about the content: never quarantined, the ranker stops."""
    (tmp_path / "store.sqlite").mkdir()
    with pytest.raises(StoreUnavailable, match="cannot be opened"):
        open_store(store, tmp_path / "store.sqlite", tmp_path, "the store")
    assert (tmp_path / "store.sqlite").is_dir() and not (tmp_path / "quarantine").exists()


def test_a_store_another_ranker_process_has_open_is_never_moved_aside(tmp_path):
    """Several ranker processes share one directory of stores (make run): the first has them open
    and marked in use; a store a later one finds unreadable stays where it is (StoreUnavailable, the
    later one does not start) instead of being moved from under the first."""
    from services.ranker.stores import open_sqlite_stores

    first = open_sqlite_stores(tmp_path, None)
    try:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "feedback.sqlite").write_bytes(GARBAGE)
        # the damage as a second process sees it: a file it cannot read (here: another file in its place)
        (tmp_path / "feedback.sqlite").rename(tmp_path / "elsewhere" / "sound.sqlite")
        (tmp_path / "elsewhere" / "feedback.sqlite").rename(tmp_path / "feedback.sqlite")
        with pytest.raises(StoreUnavailable, match="another ranker process has it open: not moved aside"):
            open_sqlite_stores(tmp_path, None)
        assert (tmp_path / "feedback.sqlite").read_bytes() == GARBAGE and not (tmp_path / "quarantine").exists()
    finally:
        first.close()
    second = open_sqlite_stores(tmp_path, None)  # alone now: recovered as a lone ranker's store is
    second.close()
    (moved,) = (tmp_path / "quarantine").rglob("feedback.sqlite")
    assert moved.read_bytes() == GARBAGE


def test_ranker_processes_starting_together_recover_a_damaged_store_once(tmp_path):
    """Two processes open one damaged store at the same moment: one moves it aside and opens an
    empty store, the other waits and opens that one (it must not move the fresh store aside too)."""
    import subprocess
    import sys

    from anime2vec.paths import REPO_ROOT

    (tmp_path / "added_anime.sqlite").write_bytes(GARBAGE)
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "import services.ranker.recovery as recovery\n"
        "from services.ranker.stores import open_sqlite_stores\n"
        # a slow move aside (a loaded machine): the other process reads the damaged file meanwhile unless it waits
        "real = recovery.quarantine\n"
        "recovery.quarantine = lambda *a: (time.sleep(0.5), real(*a))[1]\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "(d / f'ready-{sys.argv[2]}').touch()\n"
        "while not (d / 'go').exists(): time.sleep(0.002)\n"
        "s = open_sqlite_stores(d, None); s.added.put(int(sys.argv[2]), {'title': 't'}, [0.0], 'fp'); s.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(aid)], cwd=REPO_ROOT, stderr=subprocess.PIPE)
        for aid in (1, 2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{aid}").exists() for aid in (1, 2)):  # both imported: released together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
        time.sleep(0.01)
    go.touch()
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    (moved,) = (tmp_path / "quarantine").rglob("added_anime.sqlite")  # moved aside once
    assert moved.read_bytes() == GARBAGE
    store = AddedAnimeStore(tmp_path / "added_anime.sqlite")
    assert [a.anime_id for a in store.all()] == [1, 2]  # both wrote into the one fresh store
    store.close()


def test_a_store_with_a_damaged_page_is_unreadable(tmp_path):
    path = tmp_path / "added_anime.sqlite"
    s = AddedAnimeStore(path)
    for i in range(200):
        s.put(1000 + i, {"title": "x" * 500}, np.zeros(4), "fp")
    s.close()
    data = bytearray(path.read_bytes())
    data[8192:12288] = b"\x07" * 4096  # a page in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError):
        AddedAnimeStore(path)


def test_quarantine_keeps_the_relative_path(tmp_path):
    (tmp_path / "qdrant" / "users" / "v1").mkdir(parents=True)
    moved = quarantine(tmp_path / "qdrant" / "users" / "v1", tmp_path)
    assert moved.is_dir() and moved.relative_to(tmp_path / "quarantine").parts[1:] == ("qdrant", "users", "v1")


def test_new_ids_ignore_ids_outside_the_assigned_range(tmp_path):
    store = AddedAnimeStore(tmp_path / "a.sqlite")
    assert store.next_assigned_id() == ASSIGNED_IDS.start
    assert store.next_assigned_id(taken_above=ASSIGNED_IDS.start + 41) == ASSIGNED_IDS.start + 42
    for poisoned in (2**63 - 1, MAX_ANIME_ID + 1, 20):  # what an unbounded version accepted
        store.put(poisoned, {"title": "p"}, np.zeros(4), "fp")
    store.put(ASSIGNED_IDS.start + 6, {"title": "a"}, np.zeros(4), "fp")
    assert store.next_assigned_id() == ASSIGNED_IDS.start + 7
    store.put(MAX_ANIME_ID, {"title": "last"}, np.zeros(4), "fp")
    with pytest.raises(IdsExhausted):
        store.next_assigned_id()
    store.close()

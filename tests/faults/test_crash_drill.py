"""The crash-consistency drill (tests/faults/crash_drill.py), bounded: a few SIGKILL cycles of a
ranker under concurrent AddAnime / RecordFeedback writers. No acknowledged write may be lost, no
restart may fail to serve, nothing may be applied twice, and writers may see no status but OK,
UNAVAILABLE and DEADLINE_EXCEEDED. A2V_DRILL_CYCLES=<n> runs more cycles; the long run is
`python -m tests.faults.crash_drill --cycles 50` (figures in the README)."""

from __future__ import annotations

import os

import pytest

from tests.faults.crash_drill import run_drill
from tests.faults.ranker_harness import session_bundle_and_encoder

pytestmark = pytest.mark.faults

CYCLES = int(os.environ.get("A2V_DRILL_CYCLES", "2"))  # 2: a kill while serving and one during start-up


def test_kill_9_under_writes_loses_nothing_acknowledged_and_applies_nothing_twice(request, tmp_path_factory, tmp_path):
    bundle, encoder = session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)
    report = run_drill(tmp_path, bundle, encoder, cycles=CYCLES, writers=3, seed=CYCLES)
    print("\n" + report.as_json())
    assert report.cycles == CYCLES and report.restarts >= CYCLES + 1
    assert report.anime_acknowledged > 0 and report.events_acknowledged > 0, "the writers got nothing through"
    assert report.acknowledged_lost == 0, report.problems
    assert report.failed_restarts == 0, report.problems
    assert report.duplicates_applied == 0, report.problems
    assert not report.unexpected_statuses, report.unexpected_statuses

"""The feedback store's contract, run on SQLite and on a real PostgreSQL server alike: idempotent by
event id, all-or-nothing batches, arrival order, durable across reopening, exactly once when two
"replicas" (separate connections) record the same ids at the same moment."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from anime2vec.feedback import COLUMNS, FeedbackConflict
from anime2vec.feedback import FeedbackEvent as E

pytestmark = pytest.mark.timeout(300)


def test_record_is_idempotent_by_event_id_and_reads_back_in_arrival_order(stores):
    store = stores.feedback()
    batch = [E("a", 1, 10, "rated", 9, 100.0), E("b", 2, 11, "completed"), E("a", 1, 10, "rated", 9, 100.0)]
    r = store.record(batch)
    assert (r.applied, r.duplicates, r.users, r.outcomes) == (2, 1, {1, 2}, ["applied", "applied", "duplicate"])
    r = store.record(batch[:2] + [E("c", 1, 12, "added"), E("d", 1, 12, "removed")])
    assert (r.applied, r.duplicates, r.users, r.outcomes) == (
        2,
        2,
        {1},
        ["duplicate", "duplicate", "applied", "applied"],
    )
    assert [e.event_id for e in store.events_for_user(1)] == ["a", "c", "d"]  # arrival order, within a batch too
    got = store.events_for_user(1)[0]
    assert (got.user_id, got.anime_id, got.kind, got.score, got.occurred_at) == (1, 10, "rated", 9, 100.0)
    assert got.received_at is not None and store.events_for_user(1)[2].score is None
    assert store.count() == 4 and store.has_user(2) and not store.has_user(3)
    df = store.all_events()
    assert list(df.columns) == COLUMNS and list(df["event_id"]) == ["a", "b", "c", "d"]
    assert df["user_id"].dtype == np.int64 and np.isnan(df.loc[1, "score"]) and np.isnan(df.loc[1, "occurred_at"])
    assert len(store.all_events(since=float(df["received_at"].max()) + 1)) == 0


def test_an_id_reused_for_a_different_event_writes_nothing_of_the_batch(stores):
    store = stores.feedback()
    store.record([E("a", 1, 10, "rated", 9)])
    with pytest.raises(FeedbackConflict) as err:
        store.record([E("new", 1, 11, "completed"), E("a", 1, 10, "rated", 3)])
    assert err.value.conflicts == [(1, "a")]
    with pytest.raises(FeedbackConflict):  # reused within one batch
        store.record([E("x", 1, 11, "completed"), E("x", 1, 12, "completed")])
    assert store.count() == 1 and [e.event_id for e in store.events_for_user(1)] == ["a"]


@pytest.mark.parametrize(
    "event, problem",
    [
        (E("", 1, 10, "completed"), "events[0].event_id"),
        (E("nul\x00id", 1, 10, "completed"), "events[0].event_id: must not contain NUL"),
        (E("a", 0, 10, "completed"), "events[0].user_id"),
        (E("a", 1, 10, "rated"), "events[0].score"),
        (E("a", 1, 10, "liked"), "events[0].kind"),
    ],
)
def test_invalid_events_are_refused_before_anything_is_written(stores, event, problem):
    store = stores.feedback()
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        store.record([event])
    assert store.count() == 0


def test_what_was_recorded_is_there_after_reopening(stores):
    store = stores.feedback()
    store.record([E(f"e{i}", 1 + i % 3, 10 + i, "completed") for i in range(20)])
    store.close()
    again = stores.feedback()  # a new connection: migrations run again and change nothing
    assert again.count() == 20 and [e.event_id for e in again.events_for_user(2)] == [f"e{i}" for i in range(1, 20, 3)]


def test_two_replicas_recording_the_same_ids_at_once_apply_each_once(stores):
    """Two stores (two connections, as two ranker replicas) record overlapping batches at the same
    moment, some in opposite orders (PostgreSQL may report a deadlock: retried, never surfaced)."""
    replicas = [stores.feedback(), stores.feedback()]
    ids = [f"same-{i}" for i in range(40)]
    events = [E(eid, 7, 100 + i, "completed") for i, eid in enumerate(ids)]
    batches = [events[k : k + 8] for k in range(0, 40, 4)]
    results: list = []
    errors: list = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        store = replicas[n % 2]
        start.wait()
        for b in batches if n < 2 else [list(reversed(b)) for b in reversed(batches)]:
            try:
                results.append(store.record(b))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors
    assert sum(r.applied for r in results) == len(ids), "each id applied exactly once over all calls"
    assert sum(r.applied + r.duplicates for r in results) == sum(len(b) for b in batches) * 4
    stored = replicas[1].all_events()
    assert sorted(stored["event_id"]) == sorted(ids)
    # whichever replica took an event, the other reads it
    assert {e.event_id for e in replicas[0].events_for_user(7)} == set(ids)

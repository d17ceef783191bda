"""The feedback store (durable, idempotent by event id, all-or-nothing batches) and the one rule
that turns a user's events into confidences, shared by serving and retraining."""

from __future__ import annotations

import sqlite3

import pytest

from anime2vec.data.confidence import implicit_feedback
from anime2vec.feedback import (
    COLUMNS,
    FeedbackConflict,
    FeedbackEvent,
    FeedbackStore,
    interactions_from_events,
    user_confidences,
)

E = FeedbackEvent


def test_user_confidences_follow_the_training_rules_latest_event_wins_and_removed_deletes():
    events = [
        E("1", 7, 100, "rated", 9, occurred_at=10.0),  # liked: 1 + 4 * 0.8
        E("2", 7, 101, "rated", 5, occurred_at=10.0),  # a 5 is a dislike
        E("3", 7, 101, "completed", occurred_at=11.0),  # ... and completing it later keeps the 5
        E("4", 7, 102, "completed", occurred_at=10.0),  # consumed, unrated: 1.0
        E("5", 7, 103, "dropped", 8, occurred_at=10.0),  # dropped: never positive, whatever the score
        E("6", 7, 104, "added", occurred_at=10.0),  # plan to watch: not positive
        E("7", 7, 105, "rated", 10, occurred_at=10.0),
        E("8", 7, 105, "removed", occurred_at=12.0),  # removed: forgotten
        E("9", 7, 106, "rated", 6, occurred_at=20.0),  # arrives first, happened last: wins ...
        E("10", 7, 106, "added", occurred_at=15.0),  # ... over this earlier plan
        E("15", 7, 109, "dropped", occurred_at=15.0),
        E("16", 7, 109, "rated", 7, occurred_at=20.0),  # rating a dropped show: still dropped (as on MAL)
        E("11", 7, 107, "removed", occurred_at=10.0),
        E("12", 7, 107, "added", occurred_at=11.0),  # re-added after removal
        E("13", 7, 108, "added", occurred_at=10.0),
        E("14", 7, 108, "rated", 8, occurred_at=11.0),  # planned, then watched and rated
    ]
    got = user_confidences(events)
    assert got == pytest.approx(
        {100: 4.2, 101: 0.0, 102: 1.0, 103: 0.0, 104: 0.0, 106: 1.8, 107: 0.0, 108: 3.4, 109: 0.0}
    )
    # the same numbers as the training loader's rule for the equivalent MAL list rows
    conf, positive = implicit_feedback(
        [9, 5, float("nan"), 8, float("nan"), 6, 8],
        ["rated", "completed", "completed", "dropped", "plan_to_watch", "rated", "rated"],
    )
    assert list(conf) == pytest.approx([got[a] for a in (100, 101, 102, 103, 104, 106, 108)])
    assert list(positive) == [True, False, True, False, False, True, True]


def test_events_without_occurred_at_are_applied_in_received_order():
    events = [E("a", 1, 5, "rated", 9, received_at=1.0), E("b", 1, 5, "dropped", received_at=2.0)]
    assert user_confidences(events) == {5: 0.0}
    assert user_confidences(events[::-1]) == {5: 0.0}  # received_at, not list position, orders them
    assert user_confidences([]) == {}


def test_store_is_idempotent_by_event_id_and_durable(tmp_path):
    path = tmp_path / "feedback.sqlite"
    store = FeedbackStore(path)
    batch = [E("a", 1, 10, "rated", 9, 100.0), E("b", 2, 11, "completed"), E("a", 1, 10, "rated", 9, 100.0)]
    r = store.record(batch)
    assert (r.applied, r.duplicates, r.users, r.outcomes) == (2, 1, {1, 2}, ["applied", "applied", "duplicate"])
    r = store.record(batch[:2] + [E("c", 1, 12, "added")])
    assert (r.applied, r.duplicates, r.users) == (1, 2, {1})
    assert store.count() == 3
    # an id reused for a different event: the whole batch is refused, nothing written
    with pytest.raises(FeedbackConflict) as info:
        store.record([E("d", 1, 13, "completed"), E("a", 1, 10, "rated", 8, 100.0)])
    assert info.value.conflicts == [(1, "a")] and store.count() == 3
    with pytest.raises(ValueError, match=r"events\[0\].score"):
        store.record([E("e", 1, 13, "rated")])
    store.close()

    # reopened (and read by another process the same way): everything acknowledged is there
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    store = FeedbackStore(path)
    assert [e.event_id for e in store.events_for_user(1)] == ["a", "c"]
    assert store.events_for_user(1)[0] == E("a", 1, 10, "rated", 9, 100.0, store.events_for_user(1)[0].received_at)
    df = store.all_events()
    assert list(df.columns) == COLUMNS and list(df["event_id"]) == ["a", "b", "c"]
    assert df["score"].isna().tolist() == [False, True, True]
    assert len(store.all_events(since=df["received_at"].max() + 1)) == 0
    inter = interactions_from_events(df)
    assert inter.to_dict("records") == [
        {"user_id": 1, "anime_id": 10, "confidence": pytest.approx(4.2), "positive": True},
        {"user_id": 1, "anime_id": 12, "confidence": 0.0, "positive": False},
        {"user_id": 2, "anime_id": 11, "confidence": 1.0, "positive": True},
    ]
    store.close()

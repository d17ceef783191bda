"""Users updated online from feedback: the user's list, serving vector, the users collection.

After RecordFeedback stores events (anime2vec.feedback.FeedbackStore, fsynced), each affected
user is recomputed at once (steps 1-2: anime2vec/serving_model/users.py):
  1. their list: the training history (if the model was trained on them) with every anime an
     event named replaced by what the events say (`user_confidences`, the training rules);
  2. their serving vector, built exactly as the serving path builds one from a history (the
     hybrid reads the list itself: no re-solve): a training user as a known user (the "users"
     weights), a user known only through feedback as a favourites query of their liked anime
     (the "favourites" weights); the WMF fallback still re-solves their factors (ALS fold-in);
  3. stored in the users collection of the serving version, keyed by user id, with the events
     themselves in the payload.

The users collection is derived data, the feedback store is the truth. A stored vector is used
only while it reflects every event the store holds for the user (a crash between the commit and the
upsert, two replicas updating one user at once, or a write through another replica is repaired on
the next read: with the PostgreSQL store every replica reads every acknowledged event) and only for
the version it was computed for: after a new bundle is promoted the collection of the new version is
empty, and each user is recomputed lazily on their next request from the events (from the store, or
from the payload of the version served before when the store lacks them, e.g. a replica on its own
SQLite file).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from anime2vec.feedback import FeedbackEvent, RecordResult
from anime2vec.index.base import IndexUnavailable, ItemIndex, UserPoint
from anime2vec.serving.metrics import Metrics
from anime2vec.serving_model.users import OnlineUser, compute_user

if TYPE_CHECKING:
    from anime2vec.store.feedback_postgres import AnyFeedbackStore

log = logging.getLogger(__name__)
_STRIPES = 64


def _pack(e: FeedbackEvent) -> list:
    return [e.event_id, int(e.anime_id), e.kind, e.score, e.occurred_at, e.received_at]


def _unpack(user_id: int, row: list) -> FeedbackEvent:
    eid, aid, kind, score, occurred, received = row
    return FeedbackEvent(
        str(eid),
        user_id,
        int(aid),
        str(kind),
        None if score is None else int(score),
        None if occurred is None else float(occurred),
        None if received is None else float(received),
    )


class OnlineUsers:
    def __init__(self, store: AnyFeedbackStore, index: ItemIndex, metrics: Metrics):
        self.store, self.index, self.metrics = store, index, metrics
        self._locks = [threading.Lock() for _ in range(_STRIPES)]
        self.previous_versions: list[str] = []  # versions served before the current one, newest first

    def version_switched(self, old: str | None, new: str) -> None:
        if old and old != new:
            self.previous_versions = [old] + [v for v in self.previous_versions if v not in (old, new)][:4]

    # ---- writing ------------------------------------------------------------------------------
    def record(self, serving, events: list[FeedbackEvent]) -> tuple[RecordResult, list[int]]:
        """Store `events` (FeedbackConflict / ValueError propagate, nothing written), then bring
        every user of the batch up to date. Returns the store's result and the users recomputed.
        A failed vector update does not fail the call: the events are durable and the user is
        recomputed on their next request."""
        result = self.store.record(events)
        for e, outcome in zip(events, result.outcomes):
            self.metrics.feedback_events.labels(kind=e.kind, outcome=outcome).inc()
        updated = []
        for uid in sorted({int(e.user_id) for e in events}):
            try:
                _, recomputed = self.current(serving, uid, reason="feedback")
            except IndexUnavailable as err:
                log.warning("user %d: events stored, vector update failed (%s); recomputed on next read", uid, err)
                continue
            if recomputed:
                updated.append(uid)
        return result, updated

    # ---- reading ------------------------------------------------------------------------------
    def get(self, serving, user_id: int) -> OnlineUser | None:
        """The user's up-to-date state for the serving version, or None when no event is known
        for them (a training user without feedback, or an unknown user)."""
        return self.current(serving, user_id, reason="stale")[0]

    def current(self, serving, user_id: int, reason: str) -> tuple[OnlineUser | None, bool]:
        """(state, whether it was recomputed now)."""
        version = serving.version
        with self._locks[user_id % _STRIPES]:
            stored, stored_events = self._stored(version, user_id)
            local = self.store.events_for_user(user_id)
            if stored is not None and {e.event_id for e in local} <= stored.event_ids:
                return stored, False
            if stored is None:
                stored_events = self._earlier_events(user_id)
                if stored_events and not local:
                    reason = "version"
            events = {e.event_id: e for e in stored_events}
            events.update({e.event_id: e for e in local})  # same ids, same content (the store refuses conflicts)
            if not events:
                return None, False
            start = time.perf_counter()
            user = compute_user(serving.model, serving.extra, user_id, list(events.values()))
            self._put(serving, user, list(events.values()))
            self.metrics.fold_in_latency.observe(time.perf_counter() - start)
            self.metrics.user_vector_updates.labels(reason=reason).inc()
            return user, True

    def _stored(self, version: str, user_id: int) -> tuple[OnlineUser | None, list[FeedbackEvent]]:
        found = self.index.get_users(version, [user_id])
        if not found:
            return None, []
        p = found[0].payload
        events = [_unpack(user_id, r) for r in p.get("events") or []]
        vec = np.asarray(found[0].vector, np.float32) if p.get("has_vector") else None
        listed = {int(a): float(c) for a, c in zip(p.get("listed", []), p.get("confidences", []))}
        return (
            OnlineUser(user_id, version, vec, listed, float(p.get("updated_at") or 0.0), {e.event_id for e in events}),
            events,
        )

    def _earlier_events(self, user_id: int) -> list[FeedbackEvent]:
        """Events kept in the user's point of the newest earlier version: how a replica without
        the events in its own store recomputes a user after a promotion."""
        for v in self.previous_versions:
            try:
                _, events = self._stored(v, user_id)
            except IndexUnavailable:
                continue
            if events:
                return events
        return []

    def _put(self, serving, user: OnlineUser, events: list[FeedbackEvent]) -> None:
        dim = int(serving.model.item_tower.shape[1])
        vec = user.vector if user.vector is not None else np.zeros(dim, np.float32)
        payload = {
            "model_version": user.version,
            "has_vector": user.vector is not None,
            "listed": list(user.listed),
            "confidences": [round(c, 4) for c in user.listed.values()],
            "updated_at": user.updated_at,
            "events": [_pack(e) for e in events],
        }
        self.index.upsert_users(user.version, dim, [UserPoint(user.user_id, vec, payload)])

"""The feedback store on PostgreSQL: `anime2vec.feedback.FeedbackStore`'s interface and rules, shared
by every ranker replica.

Exactly once across replicas. A batch is one transaction: its new events are inserted in batch
order with `ON CONFLICT (event_id) DO NOTHING`, so an id two replicas record at the same moment is
inserted by one of them (the other's insert waits on the unique index until the first commits,
then does nothing) and reported as a duplicate by the other; ids that were already stored are then
read back and compared, and an id reused for a different event rolls the whole batch back
(FeedbackConflict), as on SQLite. The commit returns once PostgreSQL has flushed it (and, with
synchronous replication, once a standby has it): acknowledged means durable.
"""

from __future__ import annotations

import time
from typing import TypeAlias

import numpy as np
import pandas as pd
import psycopg

from anime2vec.feedback import COLUMNS, FeedbackConflict, FeedbackEvent, FeedbackStore, RecordResult, validate_event

from .postgres import Database

_SELECT = "SELECT event_id, user_id, anime_id, kind, score, occurred_at, received_at FROM events"
_DTYPES = {
    "event_id": object,
    "user_id": np.int64,
    "anime_id": np.int64,
    "kind": object,
    "score": np.float64,
    "occurred_at": np.float64,
    "received_at": np.float64,
}
STORE = "feedback"


class PostgresFeedbackStore:
    """FeedbackStore on a shared `Database` (thread-safe: each call takes a pooled connection)."""

    backend = "postgres"

    def __init__(self, db: Database):
        self.db = db

    # --- writing -------------------------------------------------------------------------------
    def record(self, events: list[FeedbackEvent]) -> RecordResult:
        """Store new events in one transaction, committed on return; see FeedbackStore.record."""
        for i, e in enumerate(events):
            problem = validate_event(e)
            if problem:
                raise ValueError(f"events[{i}].{problem}")
        return self.db.transact(STORE, "record", lambda conn: self._record(conn, events))

    @staticmethod
    def _record(conn, events: list[FeedbackEvent]) -> RecordResult:
        now = time.time()
        first: dict[str, int] = {}  # event id -> its first position in the batch
        for i, e in enumerate(events):
            first.setdefault(e.event_id, i)
        fresh = [events[i] for i in sorted(first.values())]
        cols = list(
            zip(*[(e.event_id, int(e.user_id), int(e.anime_id), e.kind, e.score, e.occurred_at, now) for e in fresh])
        )
        inserted = {
            r[0]
            for r in conn.execute(
                "INSERT INTO events (event_id, user_id, anime_id, kind, score, occurred_at, received_at) "
                "SELECT e, u, a, k, s, o, r FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], "
                "%s::integer[], %s::float8[], %s::float8[]) WITH ORDINALITY AS t(e, u, a, k, s, o, r, n) ORDER BY n "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
                [list(c) for c in cols],
            ).fetchall()
        }
        stored_before = [e.event_id for e in fresh if e.event_id not in inserted]
        prior = {}
        if stored_before:
            prior = {
                r[0]: _event(r)
                for r in conn.execute(_SELECT + " WHERE event_id = ANY(%s)", (stored_before,)).fetchall()
            }
        applied, duplicates, users, conflicts, outcomes = 0, 0, set(), [], []
        for i, e in enumerate(events):
            if first[e.event_id] == i and e.event_id in inserted:
                applied += 1
                users.add(int(e.user_id))
                outcomes.append("applied")
                continue
            duplicates += 1
            outcomes.append("duplicate")
            earlier = prior.get(e.event_id) or events[first[e.event_id]]
            if not earlier.same_event(e):
                conflicts.append((i, e.event_id))
        if conflicts:
            raise FeedbackConflict(conflicts)  # the transaction rolls back: nothing of the batch stays
        return RecordResult(applied, duplicates, users, outcomes)

    # --- reading -------------------------------------------------------------------------------
    def events_for_user(self, user_id: int) -> list[FeedbackEvent]:
        """The user's events in the order they were received (by any replica)."""
        rows = self.db.transact(
            STORE,
            "events_for_user",
            lambda conn: conn.execute(_SELECT + " WHERE user_id = %s ORDER BY seq", (int(user_id),)).fetchall(),
        )
        return [_event(r) for r in rows]

    def has_user(self, user_id: int) -> bool:
        return self.db.transact(
            STORE,
            "has_user",
            lambda conn: (
                conn.execute("SELECT 1 FROM events WHERE user_id = %s LIMIT 1", (int(user_id),)).fetchone() is not None
            ),
        )

    def count(self) -> int:
        def read(conn: psycopg.Connection) -> int:
            row = conn.execute("SELECT COUNT(*) FROM events").fetchone()
            assert row is not None  # an aggregate without GROUP BY returns one row
            return int(row[0])

        return self.db.transact(STORE, "count", read)

    def all_events(self, since: float | None = None) -> pd.DataFrame:
        """Every event (received at or after `since` if given) in received order, read in one
        REPEATABLE READ, READ ONLY transaction: a consistent snapshot while replicas keep writing."""

        def read(conn):
            sql, args = _SELECT, ()
            if since is not None:
                sql, args = sql + " WHERE received_at >= %s", (float(since),)
            with conn.cursor(name="a2v_all_events") as cur:  # server-side: streamed, not one huge result
                cur.itersize = 10_000
                cur.execute(sql + " ORDER BY seq", args)
                return list(cur)

        rows = self.db.transact(STORE, "all_events", read, snapshot=True)
        return pd.DataFrame(rows, columns=COLUMNS).astype(_DTYPES)

    def close(self) -> None:
        """The Database belongs to whoever opened it (it is shared with the added-anime store)."""


# The feedback store on either backend (SQLite: anime2vec.feedback.FeedbackStore; same interface).
AnyFeedbackStore: TypeAlias = FeedbackStore | PostgresFeedbackStore


def _event(r) -> FeedbackEvent:
    return FeedbackEvent(
        r[0],
        int(r[1]),
        int(r[2]),
        r[3],
        None if r[4] is None else int(r[4]),
        None if r[5] is None else float(r[5]),
        float(r[6]),
    )

"""User feedback events: the durable store and the one rule that turns events into confidences.

Feedback (a user rated, completed, dropped, added or removed an anime) is the input of online
learning. The ranker writes it to a store before acknowledging, folds it into the user's vector at
once, and retraining reads it back (`all_events`) to build the next bundle. Two stores, one
interface: `FeedbackStore` here (SQLite in WAL mode with `synchronous=FULL`: an acknowledged event
has been fsynced; one ranker on one machine) and `anime2vec.store.feedback_postgres` (PostgreSQL,
shared by every ranker replica), tested by the same tests (tests/store/). Both sides turn events
into implicit confidences with `user_confidences`, which applies the training rules of
`anime2vec.data.confidence`, so what serving believes about a user is what training would learn.

Event ids are chosen by the client and make a call safe to retry: an id already stored is not
applied again. Reusing an id for a *different* event is a client bug; `record` then refuses the
whole batch (`FeedbackConflict`) and writes nothing, so a batch is recorded entirely or not at all.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from anime2vec.data.confidence import implicit_feedback
from anime2vec.store.migrations import migrate_sqlite
from anime2vec.store.observe import Observer, timed

# "added": put on the user's plan-to-watch / watching list; "removed": taken off the user's list.
KINDS = ("rated", "completed", "dropped", "added", "removed")
MAX_EVENT_ID_LENGTH = 128
COLUMNS = ["event_id", "user_id", "anime_id", "kind", "score", "occurred_at", "received_at"]


@dataclass(frozen=True)
class FeedbackEvent:
    event_id: str
    user_id: int
    anime_id: int
    kind: str
    score: int | None = None  # 1..10; required for "rated", optional for completed/dropped
    occurred_at: float | None = None  # unix seconds, as the client says; None if not given
    received_at: float | None = None  # unix seconds, set by the store when recorded

    def same_event(self, other: "FeedbackEvent") -> bool:
        """Same content, whenever it was received (what a retry sends again)."""
        return (self.user_id, self.anime_id, self.kind, self.score, self.occurred_at) == (
            other.user_id,
            other.anime_id,
            other.kind,
            other.score,
            other.occurred_at,
        )


def validate_event(e: FeedbackEvent) -> str | None:
    """The problem with one event (field name first), or None. The gateway validates with its
    own field paths first; this keeps the store consistent whoever calls it."""
    if not e.event_id or len(e.event_id) > MAX_EVENT_ID_LENGTH:
        return f"event_id: must be 1..{MAX_EVENT_ID_LENGTH} characters"
    if "\x00" in e.event_id:  # PostgreSQL's text cannot hold it: refused on both backends alike
        return "event_id: must not contain NUL characters"
    if e.user_id <= 0:
        return "user_id: must be > 0"
    if e.anime_id <= 0:
        return "anime_id: must be > 0"
    if e.kind not in KINDS:
        return f"kind: unknown {e.kind!r}; valid: {', '.join(KINDS)}"
    if e.score is not None and not 1 <= e.score <= 10:
        return "score: must be 1..10"
    if e.kind == "rated" and e.score is None:
        return 'score: required for "rated"'
    if e.kind in ("added", "removed") and e.score is not None:
        return f'score: not allowed for "{e.kind}"'
    return None


@dataclass
class RecordResult:
    applied: int  # events newly stored
    duplicates: int  # events whose id was already stored (or repeated in the batch)
    users: set[int] = field(default_factory=set)  # users with at least one newly stored event
    outcomes: list[str] = field(default_factory=list)  # per event of the batch: "applied" / "duplicate"


class FeedbackConflict(ValueError):
    """Event ids reused for different events; nothing of the batch was written."""

    def __init__(self, conflicts: list[tuple[int, str]]):
        self.conflicts = conflicts  # (position in the batch, event_id)
        super().__init__(
            "event id already used for a different event: "
            + ", ".join(f"events[{i}] {eid!r}" for i, eid in conflicts[:5])
        )


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(path: Path) -> None:
    """sqlite3.DatabaseError if `path` exists and is not an SQLite database (sqlite3.OperationalError
    if it cannot be read now), checked before SQLite opens it: SQLite, failing on such a file, may
    still delete or reset the -wal beside it, which is evidence (and maybe data) worth keeping."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as e:  # unreadable now (a directory, permissions, I/O): nothing known about the content
        raise sqlite3.OperationalError(f"cannot read {path}: {e}") from e
    if head and head != SQLITE_HEADER:
        raise sqlite3.DatabaseError(f"file is not a database (it starts with {head[:8]!r}, not the SQLite header)")


class FeedbackStore:
    """The events table (see `COLUMNS`) in an SQLite file, one connection behind a lock
    (thread-safe). Opening a file that is not a sound SQLite database raises sqlite3.DatabaseError
    and changes nothing. `observe` is told each operation's latency and outcome (metrics)."""

    backend = "sqlite"

    def __init__(self, path: Path | str, observe: Observer | None = None):
        self.observe = observe
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        check_sqlite_file(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=10000")  # a second process (retraining) may read
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
            migrate_sqlite(self._db, "sqlite_feedback")  # anime2vec/store/sql/sqlite_feedback/
            # a damaged page may only surface when read: find out at opening, not in a request
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
        except sqlite3.DatabaseError:  # not a database, or a damaged one: the caller decides
            self._db.close()
            raise
        self._lock = threading.Lock()

    # --- writing -------------------------------------------------------------------------------
    def record(self, events: list[FeedbackEvent]) -> RecordResult:
        """Store new events in one transaction (committed, i.e. fsynced, on return).

        Ids already stored, or repeated within the batch, count as duplicates and are not applied
        again. Raises FeedbackConflict (writing nothing) if an id is reused for a different
        event, ValueError if an event is invalid.
        """
        for i, e in enumerate(events):
            problem = validate_event(e)
            if problem:
                raise ValueError(f"events[{i}].{problem}")
        with timed(self.observe, "feedback", "record", _classify):
            return self._record(events)

    def _record(self, events: list[FeedbackEvent]) -> RecordResult:
        now = time.time()
        applied, duplicates, users, conflicts, outcomes = 0, 0, set(), [], []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen: dict[str, FeedbackEvent] = {}
                for i, e in enumerate(events):
                    prior = seen.get(e.event_id) or self._get(e.event_id)
                    if prior is not None:
                        duplicates += 1
                        outcomes.append("duplicate")
                        if not prior.same_event(e):
                            conflicts.append((i, e.event_id))
                        continue
                    self._db.execute(
                        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (e.event_id, int(e.user_id), int(e.anime_id), e.kind, e.score, e.occurred_at, now),
                    )
                    seen[e.event_id] = e
                    outcomes.append("applied")
                    applied += 1
                    users.add(int(e.user_id))
                if conflicts:
                    raise FeedbackConflict(conflicts)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return RecordResult(applied, duplicates, users, outcomes)

    # --- reading -------------------------------------------------------------------------------
    def _get(self, event_id: str) -> FeedbackEvent | None:
        r = self._db.execute("SELECT * FROM events WHERE event_id=?", (event_id,)).fetchone()
        return _event(r) if r else None

    def events_for_user(self, user_id: int) -> list[FeedbackEvent]:
        """The user's events in the order they were received."""
        with timed(self.observe, "feedback", "events_for_user", _classify), self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE user_id=? ORDER BY rowid", (int(user_id),)).fetchall()
        return [_event(r) for r in rows]

    def has_user(self, user_id: int) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM events WHERE user_id=? LIMIT 1", (int(user_id),)).fetchone() is not None
            )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def all_events(self, since: float | None = None) -> pd.DataFrame:
        """Every event (received at or after `since`, unix seconds, if given) in received order,
        with the table's columns; score / occurred_at are NaN where absent."""
        sql = "SELECT * FROM events"
        args: tuple[float, ...] = ()
        if since is not None:
            sql, args = sql + " WHERE received_at >= ?", (float(since),)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        df = pd.DataFrame(rows, columns=COLUMNS)
        return df.astype(
            {
                "event_id": object,
                "user_id": np.int64,
                "anime_id": np.int64,
                "kind": object,
                "score": np.float64,
                "occurred_at": np.float64,
                "received_at": np.float64,
            }
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _classify(e: BaseException) -> str:
    return "unavailable" if isinstance(e, sqlite3.OperationalError) else "error"


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


# --- events -> confidences ----------------------------------------------------------------------
# What a feedback kind means as a MAL list status (anime2vec.data.confidence.STATUSES).
_STATUS = {"completed": "completed", "dropped": "dropped", "added": "plan_to_watch"}


def _order_key(e: FeedbackEvent, position: int):
    # When it happened (the client's clock if given, else when we got it), then arrival order:
    # a batch uploaded late from a phone is still folded in the order the user acted.
    when = e.occurred_at if e.occurred_at is not None else (e.received_at or 0.0)
    return (when, position)


def user_state(events: Iterable[FeedbackEvent]) -> dict[int, tuple[str, int | None]]:
    """Fold events into each anime's list entry: anime_id -> (MAL status, score or None).

    The latest event per anime (see `_order_key`) sets the status: "rated" marks the show rated
    (watched), "completed"/"dropped" set that status, "added" means plan to watch, "removed"
    deletes the entry. A score persists until a later event brings its own or the entry is
    removed or re-added (so "rated 3" then "completed" stays a dislike, as on a MAL list).
    """
    entries: dict[int, tuple[str, int | None]] = {}
    ordered = sorted(enumerate(events), key=lambda p: _order_key(p[1], p[0]))
    for _, e in ordered:
        aid = int(e.anime_id)
        if e.kind == "removed":
            entries.pop(aid, None)
            continue
        prev_status, prev_score = entries.get(aid, (None, None))
        score = e.score if e.score is not None else (None if e.kind == "added" else prev_score)
        if e.kind == "rated":
            # A rating keeps a "completed"/"dropped" status (you can rate a show you dropped).
            status = prev_status if prev_status in ("completed", "dropped") else "rated"
        else:
            status = _STATUS[e.kind]
        entries[aid] = (status, score)
    return entries


def user_confidences(events: Iterable[FeedbackEvent]) -> dict[int, float]:
    """anime_id -> implicit confidence for one user's events, by the training rules.

    Every anime still on the user's list is returned: a positive has confidence > 0 (0.5..5.0, as
    in `anime2vec.data.confidence`), a dropped, plan-to-watch or scored-5-or-less show has 0.0
    (never a positive, but serving still keeps it out of the user's recommendations). Removed
    shows are absent.
    """
    entries = user_state(events)
    if not entries:
        return {}
    ids = list(entries)
    statuses = [entries[a][0] for a in ids]
    scores = [np.nan if (score := entries[a][1]) is None else float(score) for a in ids]
    # "rated" with no score cannot happen (validated), but a "rated" status inherited a score.
    statuses = [("listed" if s == "rated" and np.isnan(r) else s) for s, r in zip(statuses, scores)]
    confidence, _ = implicit_feedback(np.asarray(scores, np.float32), statuses)
    return {a: float(c) for a, c in zip(ids, confidence)}


def interactions_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """The events of `FeedbackStore.all_events` as interaction rows (user_id, anime_id,
    confidence, positive), one per (user, anime) still listed: the form training consumes."""
    rows = []
    for uid, group in events.groupby("user_id", sort=True):
        evs = [
            FeedbackEvent(
                r.event_id,
                int(r.user_id),
                int(r.anime_id),
                r.kind,
                None if pd.isna(r.score) else int(r.score),
                None if pd.isna(r.occurred_at) else float(r.occurred_at),
                float(r.received_at),
            )
            for r in group.itertuples(index=False)
        ]
        for aid, c in user_confidences(evs).items():
            rows.append((int(uid), aid, np.float32(c), c > 0))
    return pd.DataFrame(rows, columns=["user_id", "anime_id", "confidence", "positive"]).astype(
        {"user_id": np.int64, "anime_id": np.int64, "confidence": np.float32, "positive": bool}
    )

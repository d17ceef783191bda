"""Durable record of anime added through UpsertAnime, and the rules for their ids.

Two stores, one interface (the same tests run against both, tests/store/): `AddedAnimeStore`, an
SQLite file (WAL) beside one ranker, and `PostgresAddedAnimeStore`, one table every ranker replica
shares. Each write gets a `revision`, increasing in commit order, so a replica that did not make a
write learns of it by asking for `changes_since` the last revision it applied (and, on PostgreSQL,
is woken by a NOTIFY at commit): services/ranker/catalog_follower.py.

The Qdrant collection is derived data: it is rebuilt for every model version. The anime added
at run time are the one thing no bundle holds, so they are committed here *before* the RPC is
acknowledged, with the raw encoder vector, and replayed into whichever collection serves (at
start-up and after a model switch, when the new item tower must re-embed them).

Ids. Every anime id is in 1..MAX_ANIME_ID (2**31 - 1: MyAnimeList's ids are below 100,000, and an
id of this size is exact everywhere it travels: SQLite, Qdrant, JSON doubles). The ranker assigns
the ids of new anime from ASSIGNED_IDS, a range callers may not create ids in, so an assigned id
can never collide with a caller's. The next one is one above the largest *in that range*: an id
outside it (an earlier version accepted any positive int64, and `2**63 - 1` made MAX(id) + 1
overflow) cannot steer or break the allocation.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np

from anime2vec.feedback import check_sqlite_file
from anime2vec.store.migrations import migrate_sqlite
from anime2vec.store.observe import Observer, timed

MAX_ANIME_ID = 2**31 - 1
ASSIGNED_IDS = range(100_000_000, MAX_ANIME_ID + 1)  # far above MAL's ids
STORE = "added_anime"
NOTIFY_CHANNEL = "a2v_added_anime"
# pg_advisory_xact_lock key held by every write until it commits: revisions commit in order, and
# assigning a new id and writing it is one step across replicas
WRITE_LOCK = 0x61326164  # "a2ad"


class StoreUnreadable(sqlite3.DatabaseError):
    """The store's file is not a readable SQLite database of ours (garbage, truncated, malformed)."""


class IdsExhausted(Exception):
    """Every id of ASSIGNED_IDS is taken."""


@dataclass
class AddedAnime:
    anime_id: int
    fields: dict  # AnimeInput as a dict (title, synopsis, genres, ...)
    raw_vector: np.ndarray  # encoder output, before whitening
    encoder_fingerprint: str
    updated_at: float
    revision: int = 0  # order of the writes: higher is later


@dataclass(frozen=True)
class Written:
    """What a write did: the anime's id, whether the id was new to the store, its revision."""

    anime_id: int
    created: bool
    revision: int


def next_id(top_assigned: int | None, taken_above: int) -> int:
    """The id after the largest assigned one and `taken_above`; IdsExhausted past the range."""
    nxt = max(ASSIGNED_IDS.start, (top_assigned or 0) + 1, taken_above + 1)
    if nxt not in ASSIGNED_IDS:
        raise IdsExhausted(f"every id in {ASSIGNED_IDS.start}..{ASSIGNED_IDS.stop - 1} is taken")
    return nxt


def _row(r) -> AddedAnime:
    return AddedAnime(
        int(r[0]), json.loads(r[1]), np.frombuffer(bytes(r[2]), np.float32).copy(), r[3], float(r[4]), int(r[5])
    )


def _blob(raw_vector: np.ndarray) -> bytes:
    return np.asarray(raw_vector, np.float32).tobytes()


def _sqlite_outcome(e: BaseException) -> str:
    return "unavailable" if isinstance(e, sqlite3.OperationalError) else "error"


_COLUMNS = "anime_id, fields, raw_vector, encoder_fingerprint, updated_at, revision"
# SQLite keeps revisions in a table of their own (sql/sqlite_added_anime/0002_revision.sql)
_SQLITE_SELECT = (
    "SELECT a.anime_id, a.fields, a.raw_vector, a.encoder_fingerprint, a.updated_at, "
    "COALESCE(r.revision, 0) FROM added_anime AS a LEFT JOIN added_anime_revision AS r USING (anime_id)"
)


class AddedAnimeStore:
    """The store in an SQLite file (one ranker). Thread-safe: one connection behind a lock."""

    backend = "sqlite"

    def __init__(self, path: Path, observe: Observer | None = None):
        """Opens (or creates, or migrates) the store and reads it once through: StoreUnreadable when
        the file is not a sound database (the caller decides what to do with it; nothing is changed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.observe = path, observe
        self._lock = threading.Lock()
        try:
            check_sqlite_file(path)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise StoreUnreadable(str(e)) from None
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=10000")  # another process may hold the write lock a moment
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
            # a damaged page may only surface when read: find out now, not in a request
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            migrate_sqlite(self._db, "sqlite_added_anime")  # anime2vec/store/sql/sqlite_added_anime/
            self.all()
        except sqlite3.OperationalError:  # locked, unopenable, I/O: says nothing about the file's content
            self._db.close()
            raise
        except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: a row that does not decode
            self._db.close()
            raise StoreUnreadable(str(e)) from e

    def _write(self, operation: str, fn) -> Written:
        with timed(self.observe, STORE, operation, _sqlite_outcome), self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _insert(self, anime_id: int, fields: dict, raw_vector, encoder_fingerprint: str) -> Written:
        existed = self._db.execute("SELECT 1 FROM added_anime WHERE anime_id=?", (anime_id,)).fetchone()
        (rev,) = self._db.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM added_anime_revision").fetchone()
        self._db.execute(
            "INSERT OR REPLACE INTO added_anime (anime_id, fields, raw_vector, encoder_fingerprint, "
            "updated_at) VALUES (?, ?, ?, ?, ?)",
            (anime_id, json.dumps(fields, ensure_ascii=False), _blob(raw_vector), encoder_fingerprint, time.time()),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO added_anime_revision (anime_id, revision) VALUES (?, ?)", (anime_id, rev)
        )
        return Written(anime_id, existed is None, int(rev))

    def put(self, anime_id: int, fields: dict, raw_vector: np.ndarray, encoder_fingerprint: str) -> Written:
        """Insert or replace by id, committed (fsynced) on return."""
        return self._write("put", lambda: self._insert(int(anime_id), fields, raw_vector, encoder_fingerprint))

    def add_new(self, fields: dict, raw_vector: np.ndarray, encoder_fingerprint: str, taken_above: int = 0) -> Written:
        """Store a new anime under the next assigned id (see `next_assigned_id`), in one step."""

        def add():
            (top,) = self._db.execute(
                "SELECT MAX(anime_id) FROM added_anime WHERE anime_id BETWEEN ? AND ?",
                (ASSIGNED_IDS.start, ASSIGNED_IDS.stop - 1),
            ).fetchone()
            return self._insert(next_id(top, taken_above), fields, raw_vector, encoder_fingerprint)

        return self._write("add_new", add)

    def has(self, anime_id: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM added_anime WHERE anime_id=?", (anime_id,)).fetchone() is not None

    def all(self) -> list[AddedAnime]:
        """Every stored anime, by id."""
        with self._lock:
            rows = self._db.execute(_SQLITE_SELECT + " ORDER BY a.anime_id").fetchall()
        return [_row(r) for r in rows]

    def changes_since(self, revision: int) -> list[AddedAnime]:
        """Anime written after `revision`, in revision order."""
        with self._lock:
            rows = self._db.execute(
                _SQLITE_SELECT + " WHERE COALESCE(r.revision, 0) > ? ORDER BY 6", (int(revision),)
            ).fetchall()
        return [_row(r) for r in rows]

    def revision(self) -> int:
        """The latest revision written (0: none)."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM added_anime_revision").fetchone()[0])

    def next_assigned_id(self, taken_above: int = 0) -> int:
        """The id for a new anime: above every assigned id stored so far and above `taken_above`
        (e.g. the largest bundle id in ASSIGNED_IDS); IdsExhausted past the range. `add_new`
        assigns and writes in one step; this only tells."""
        with self._lock:
            (top,) = self._db.execute(
                "SELECT MAX(anime_id) FROM added_anime WHERE anime_id BETWEEN ? AND ?",
                (ASSIGNED_IDS.start, ASSIGNED_IDS.stop - 1),
            ).fetchone()
        return next_id(top, taken_above)

    def wait_for_changes(self, timeout_s: float, stop: threading.Event) -> None:
        """Return after `timeout_s` or when `stop` is set: this store has no other writer to wait for."""
        stop.wait(timeout_s)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresAddedAnimeStore:
    """The store in PostgreSQL, shared by every ranker replica (anime2vec.store.postgres.Database).

    Every write holds the advisory lock WRITE_LOCK until it commits: revisions (MAX + 1 under the
    lock) become visible in increasing order, so following `changes_since` never skips a write,
    and `add_new` picks its id and writes it as one step, so two replicas never assign one id
    twice. Writes are rare (catalogue changes), so serialising them costs nothing that matters.
    A write NOTIFYs NOTIFY_CHANNEL with its revision when it commits."""

    backend = "postgres"

    def __init__(self, db):
        self.db = db
        self.all()  # every row decodes, or the ranker does not start

    def _insert(self, conn, anime_id: int, fields: dict, raw_vector, encoder_fingerprint: str) -> Written:
        created, rev = conn.execute(
            f"INSERT INTO added_anime ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, "
            "(SELECT COALESCE(MAX(revision), 0) + 1 FROM added_anime)) "
            "ON CONFLICT (anime_id) DO UPDATE SET fields = EXCLUDED.fields, raw_vector = EXCLUDED.raw_vector, "
            "encoder_fingerprint = EXCLUDED.encoder_fingerprint, updated_at = EXCLUDED.updated_at, "
            "revision = EXCLUDED.revision RETURNING (xmax = 0), revision",
            # ASCII-escaped JSON: a NUL in a title is the six characters \u0000, which text can hold
            (int(anime_id), json.dumps(fields, ensure_ascii=True), _blob(raw_vector), encoder_fingerprint, time.time()),
        ).fetchone()
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(rev)))
        return Written(int(anime_id), bool(created), int(rev))

    def put(self, anime_id: int, fields: dict, raw_vector: np.ndarray, encoder_fingerprint: str) -> Written:
        """Insert or replace by id, committed on return."""

        def write(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            return self._insert(conn, anime_id, fields, raw_vector, encoder_fingerprint)

        return self.db.transact(STORE, "put", write)

    def add_new(self, fields: dict, raw_vector: np.ndarray, encoder_fingerprint: str, taken_above: int = 0) -> Written:
        def write(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            (top,) = conn.execute(
                "SELECT MAX(anime_id) FROM added_anime WHERE anime_id BETWEEN %s AND %s",
                (ASSIGNED_IDS.start, ASSIGNED_IDS.stop - 1),
            ).fetchone()
            return self._insert(conn, next_id(top, taken_above), fields, raw_vector, encoder_fingerprint)

        return self.db.transact(STORE, "add_new", write)

    def has(self, anime_id: int) -> bool:
        return self.db.transact(
            STORE,
            "has",
            lambda conn: (
                conn.execute("SELECT 1 FROM added_anime WHERE anime_id = %s", (int(anime_id),)).fetchone() is not None
            ),
        )

    def all(self) -> list[AddedAnime]:
        rows = self.db.transact(
            STORE, "all", lambda conn: conn.execute(f"SELECT {_COLUMNS} FROM added_anime ORDER BY anime_id").fetchall()
        )
        return [_row(r) for r in rows]

    def changes_since(self, revision: int) -> list[AddedAnime]:
        rows = self.db.transact(
            STORE,
            "changes_since",
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM added_anime WHERE revision > %s ORDER BY revision", (int(revision),)
            ).fetchall(),
        )
        return [_row(r) for r in rows]

    def revision(self) -> int:
        return int(
            self.db.transact(
                STORE,
                "revision",
                lambda conn: conn.execute("SELECT COALESCE(MAX(revision), 0) FROM added_anime").fetchone()[0],
            )
        )

    def next_assigned_id(self, taken_above: int = 0) -> int:
        (top,) = self.db.transact(
            STORE,
            "next_assigned_id",
            lambda conn: conn.execute(
                "SELECT MAX(anime_id) FROM added_anime WHERE anime_id BETWEEN %s AND %s",
                (ASSIGNED_IDS.start, ASSIGNED_IDS.stop - 1),
            ).fetchone(),
        )
        return next_id(top, taken_above)

    def wait_for_changes(self, timeout_s: float, stop: threading.Event) -> None:
        """Return when another replica's write commits (NOTIFY), after `timeout_s`, or soon after
        `stop` is set. The caller still polls changes_since: a notification can be missed while
        the listening connection is down, a poll cannot."""
        conn = getattr(self, "_listener", None)
        try:
            if conn is None or conn.closed:
                conn = self._listener = self.db.notify_connection()
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            deadline = time.monotonic() + timeout_s
            while not stop.is_set() and time.monotonic() < deadline:
                slice_s = min(1.0, max(0.0, deadline - time.monotonic()))
                if any(True for _ in conn.notifies(timeout=slice_s, stop_after=1)):
                    # drain what else arrived at once: one poll covers them all
                    for _ in conn.notifies(timeout=0.01):
                        pass
                    return
        except Exception:  # the listening connection broke: poll on the timeout until it is back
            self._drop_listener()
            stop.wait(timeout_s)

    def _drop_listener(self) -> None:
        conn, self._listener = getattr(self, "_listener", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        """Closes the listening connection; the Database belongs to whoever opened it."""
        self._drop_listener()


# The store of added anime on either backend (one interface, see the module docstring).
AnyAddedAnimeStore: TypeAlias = AddedAnimeStore | PostgresAddedAnimeStore

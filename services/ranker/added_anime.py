"""Durable record of anime added through UpsertAnime (SQLite, WAL), and the rules for their ids.

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

import numpy as np

from anime2vec.feedback import check_sqlite_file

MAX_ANIME_ID = 2**31 - 1
ASSIGNED_IDS = range(100_000_000, MAX_ANIME_ID + 1)   # far above MAL's ids


class StoreUnreadable(sqlite3.DatabaseError):
    """The store's file is not a readable SQLite database of ours (garbage, truncated, malformed)."""


class IdsExhausted(Exception):
    """Every id of ASSIGNED_IDS is taken."""


@dataclass
class AddedAnime:
    anime_id: int
    fields: dict             # AnimeInput as a dict (title, synopsis, genres, ...)
    raw_vector: np.ndarray   # encoder output, before whitening
    encoder_fingerprint: str
    updated_at: float


class AddedAnimeStore:
    def __init__(self, path: Path):
        """Opens (or creates) the store and reads it once through: StoreUnreadable when the file
        is not a sound database (the caller decides what to do with it; nothing is changed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            check_sqlite_file(path)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise StoreUnreadable(str(e)) from None
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=10000")  # replicas may share the file (production overlay)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # acknowledged means on disk
            self._db.execute("""CREATE TABLE IF NOT EXISTS added_anime (
                anime_id INTEGER PRIMARY KEY, fields TEXT NOT NULL, raw_vector BLOB NOT NULL,
                encoder_fingerprint TEXT NOT NULL, updated_at REAL NOT NULL)""")
            # a damaged page may only surface when read: find out now, not in a request
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            self.all()
        except sqlite3.OperationalError:   # locked, unopenable, I/O: says nothing about the file's content
            self._db.close()
            raise
        except (sqlite3.DatabaseError, ValueError) as e:   # ValueError: a row that does not decode
            self._db.close()
            raise StoreUnreadable(str(e)) from e

    def put(self, anime_id: int, fields: dict, raw_vector: np.ndarray, encoder_fingerprint: str) -> bool:
        """Insert or replace; returns True when the id was new."""
        blob = np.asarray(raw_vector, np.float32).tobytes()
        with self._lock:
            existed = self._db.execute("SELECT 1 FROM added_anime WHERE anime_id=?", (anime_id,)).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO added_anime VALUES (?, ?, ?, ?, ?)",
                (anime_id, json.dumps(fields, ensure_ascii=False), blob, encoder_fingerprint, time.time()))
        return existed is None

    def has(self, anime_id: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM added_anime WHERE anime_id=?", (anime_id,)).fetchone() is not None

    def all(self) -> list[AddedAnime]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM added_anime ORDER BY anime_id").fetchall()
        return [AddedAnime(r[0], json.loads(r[1]), np.frombuffer(r[2], np.float32).copy(), r[3], r[4]) for r in rows]

    def next_assigned_id(self, taken_above: int = 0) -> int:
        """The id for a new anime: above every assigned id stored so far and above `taken_above`
        (e.g. the largest bundle id in ASSIGNED_IDS); IdsExhausted past the range."""
        with self._lock:
            (top,) = self._db.execute("SELECT MAX(anime_id) FROM added_anime WHERE anime_id BETWEEN ? AND ?",
                                      (ASSIGNED_IDS.start, ASSIGNED_IDS.stop - 1)).fetchone()
        nxt = max(ASSIGNED_IDS.start, (top or 0) + 1, taken_above + 1)
        if nxt not in ASSIGNED_IDS:
            raise IdsExhausted(f"every id in {ASSIGNED_IDS.start}..{ASSIGNED_IDS.stop - 1} is taken")
        return nxt

    def close(self) -> None:
        with self._lock:
            self._db.close()

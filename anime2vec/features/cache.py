"""A persistent cache of text encodings, so re-training or re-indexing encodes only new text.

Keyed by (encoder fingerprint, sha256 of the text): a changed model, pooling or truncation is a
different fingerprint and so never reads stale vectors. SQLite in WAL mode lets several processes
(a training job, the encoder service) read while one writes.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from anime2vec.paths import default_cache_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS encodings (
    fingerprint TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (fingerprint, text_sha256)
) WITHOUT ROWID
"""
_LOOKUP_CHUNK = 500  # keys per SELECT, well under SQLite's bound-parameter limit


class Encoder(Protocol):
    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray: ...


@dataclass(frozen=True)
class CacheStats:
    """hits / misses count input positions; `encoded` counts distinct texts sent to the encoder."""

    hits: int
    misses: int
    encoded: int


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EncodingCache:
    """(fingerprint, text) → float32 vector. Usable from several threads; close() when done."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_cache_dir() / "encodings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        with self._db:
            self._db.execute(_SCHEMA)
        # Stats of the latest encode_cached call on this cache (None before the first).
        self.last_stats: CacheStats | None = None

    def get_many(self, fingerprint: str, keys: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        """The cached vectors among `keys` (text_key values), by key."""
        found: dict[str, np.ndarray] = {}
        keys = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                rows = self._db.execute(
                    f"SELECT text_sha256, dim, vector FROM encodings WHERE fingerprint = ? "
                    f"AND text_sha256 IN ({','.join('?' * len(chunk))})",
                    [fingerprint, *chunk],
                ).fetchall()
                for key, row_dim, blob in rows:
                    if row_dim != dim or len(blob) != 4 * dim:
                        raise ValueError(
                            f"{self.path}: entry ({fingerprint}, {key}) holds {len(blob) // 4} floats "
                            f"(dim column {row_dim}); the encoder's dim is {dim}"
                        )
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, fingerprint: str, items: dict[str, np.ndarray]) -> None:
        """Store vectors by text_key, in one transaction."""
        rows = []
        for key, vec in items.items():
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            if vec.ndim != 1:
                raise ValueError(f"vector for {key} has shape {vec.shape}, expected 1-D")
            rows.append((fingerprint, key, vec.shape[0], vec.tobytes()))
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO encodings VALUES (?, ?, ?, ?)", rows)

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            if fingerprint is None:
                return self._db.execute("SELECT COUNT(*) FROM encodings").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM encodings WHERE fingerprint = ?", (fingerprint,)).fetchone()[
                0
            ]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "EncodingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_cached(
    encoder: Encoder, texts: Sequence[str], cache: EncodingCache, progress: bool = False, chunk: int = 1024
) -> np.ndarray:
    """encoder.encode(texts), reading what `cache` already holds and storing the rest.

    Identical texts are encoded once. Returns (len(texts), encoder.dim) float32 in input order;
    the hit/miss counts of the call are left in `cache.last_stats`. Missing texts are encoded and
    stored `chunk` at a time, so an interrupted encode (the full catalogue takes ~20 min on a
    laptop CPU) resumes where it stopped.
    """
    if isinstance(texts, str):
        raise TypeError("encode_cached takes a sequence of texts, not one str")
    texts = list(texts)
    keys = [text_key(t) if isinstance(t, str) else None for t in texts]
    for i, k in enumerate(keys):
        if k is None:
            raise TypeError(f"texts[{i}] is {type(texts[i]).__name__}, not str")
    found = cache.get_many(encoder.fingerprint, keys, encoder.dim)
    missing = {k: t for k, t in zip(keys, texts) if k not in found}  # dedup: one text per key
    if missing:
        from tqdm.auto import tqdm

        todo = list(missing.items())
        with tqdm(total=len(todo), disable=not progress, desc="encode", unit="text") as bar:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                vectors = encoder.encode([t for _, t in part])
                new = {k: v for (k, _), v in zip(part, vectors)}
                cache.put_many(encoder.fingerprint, new)  # committed: a restart skips these
                found.update(new)
                bar.update(len(part))
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for i, k in enumerate(keys):
        out[i] = found[k]
    hits = sum(1 for k in keys if k not in missing)
    cache.last_stats = CacheStats(hits=hits, misses=len(keys) - hits, encoded=len(missing))
    return out

"""The ranker's item index: V̂ item-tower vectors in Qdrant, one collection per model version behind
one alias, so that promoting or rolling back a version is a single atomic alias switch.

Two backends implement `ItemIndex`:
- `EdgeItemIndex` (edge.py, the default): the Qdrant engine embedded in-process through
  qdrant-edge, one shard directory per version under a root directory and an `aliases.json` record.
- `QdrantItemIndex` (client.py): a Qdrant server or cluster via qdrant-client when
  `QDRANT_URL` is set; collections `anime2vec_items_<version>` behind the alias `anime2vec_items`.

Scores are dot products (V̂·Û). Point ids are anime ids. Filters are pushed down into Qdrant as
payload conditions, so a filtered page is the exact filtered top-k, not a post-filtered one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ContextManager, Protocol, SupportsInt

import numpy as np

ALIAS = "anime2vec_items"
COLLECTION_PREFIX = ALIAS + "_"
# Users updated online (feedback): one collection per model version, because a user's serving
# vector only means something against that version's item vectors. Point ids are user ids.
USERS_PREFIX = "anime2vec_users_"
# Derived payload fields that carry case-folded copies of `genres` and `type`, because Qdrant
# keyword matching is case-sensitive while the API's genre/type filters are not. They are indexed,
# written on every upsert and stripped from the payload callers see.
GENRES_KEY = "_genres"
TYPE_KEY = "_type"
# Item payloads carry "cold": no interactions in the data the serving model was trained on (anime
# added through AddAnime, catalogue anime nobody rated, held-out anime). Filters.cold_start_only
# matches it; both backends keep a bool payload index on it.
COLD_KEY = "cold"
_DERIVED = (GENRES_KEY, TYPE_KEY)
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Search modes. Every collection also holds int8 scalar-quantised copies of its vectors (4× fewer
# bytes to scan), so the mode is chosen per query: exact=True scans the float32 vectors (the ranking
# equals numpy's); exact=False scans the int8 copies and rescores the best oversampling × (offset +
# limit) with the float32 vectors, so returned scores are always exact. Measured on the full
# catalogue (16,686 × 917, 200 favourites and user queries, bench/search.py has the figures): at
# oversampling 8, recall 0.9995-1.000 against exact at top-11 and top-100, at about a third of the
# exact scan's latency; at 4 a few top-11 lists lost a boundary item. The quantile clips the 1% most extreme
# coordinates when fitting the int8 range (it measured better than the full range).
QUANTIZATION_QUANTILE = 0.99
DEFAULT_OVERSAMPLING = 8.0
# Rescoring reads float32 vectors at random: 800 of them (top-100 at 8×) cost ~1.5 ms, so deep
# pages and re-rank pools oversample less (top-100: 4×, recall@100 0.9997 measured; a pool of 500:
# none, the pool's last places barely matter to a re-ranked first page).
RESCORE_BUDGET = 400


def effective_oversampling(limit: int, offset: int, oversampling: float) -> float:
    return max(1.0, min(oversampling, RESCORE_BUDGET / (offset + limit)))


QueryHook = Callable[[str, float], None]
"""on_query(operation, seconds): called after every data-plane call ("search", "search_batch",
"get", "count", "upsert"), e.g. to observe a2v_qdrant_query_seconds{operation}."""


class ItemIndexError(Exception):
    """Base of the errors this module raises on purpose."""


class IndexUnavailable(ItemIndexError):
    """The backend cannot be reached (server down, timeout) or its storage cannot be opened
    (e.g. a shard directory locked by another process)."""


class AliasUnreadable(IndexUnavailable):
    """The alias record exists but does not name a version (garbage, truncated, hand-edited)."""


class UnknownVersion(ItemIndexError, KeyError):
    """No (complete) collection for this version, or no version promoted behind the alias."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class VersionExists(ItemIndexError):
    """create_version on a version that is already built, without overwrite=True."""


class VersionInUse(ItemIndexError):
    """Deleting or rebuilding the version the alias points at (demote it first)."""


@dataclass
class ItemPoint:
    """One anime in the index. `vector` is None only in `get(..., with_vectors=False)` results."""

    anime_id: int
    vector: np.ndarray | None
    payload: dict[str, Any]


@dataclass
class UserPoint:
    """One user's serving query vector for a model version, and what it was computed from."""

    user_id: int
    vector: np.ndarray
    payload: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    anime_id: int
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class SearchFilter:
    """Payload filter; all given parts must hold. Genre and type matching is case-insensitive.
    A year bound drops anime whose year is unknown (null)."""

    include_genres: Sequence[str] = ()  # at least one of these genres
    exclude_genres: Sequence[str] = ()  # none of these genres
    types: Sequence[str] = ()  # type is one of these
    year_min: int | None = None  # inclusive
    year_max: int | None = None  # inclusive
    exclude_ids: Sequence[int] = ()
    cold_only: bool = False  # only anime whose payload says cold (COLD_KEY)


class ItemIndex(Protocol):
    """What the ranker needs from Qdrant. `version=None` always means "the alias target" and is
    resolved per call, so a promotion takes effect on the next call without a restart."""

    def create_version(
        self, version: str, dim: int, points: Iterable[ItemPoint], batch: int = 1024, overwrite: bool = False
    ) -> int:
        """Build the collection for a bundle version completely, then mark it complete; returns the
        number of points written. Does not touch the alias. Raises VersionExists unless
        overwrite=True, and VersionInUse when overwriting the alias target."""

    def has_version(self, version: str) -> bool:
        """True when a complete collection exists for `version`."""

    def versions(self) -> list[str]:
        """Complete versions, sorted."""

    def set_alias(self, version: str) -> None:
        """Atomically point the alias at `version` (promotion and rollback alike)."""

    def alias_target(self) -> str | None:
        """The version the alias points at, or None before the first promotion."""

    def upsert(self, points: Sequence[ItemPoint], version: str | None = None) -> None:
        """Insert or replace points; searchable when this returns."""

    def search(
        self,
        vector: np.ndarray,
        limit: int,
        offset: int = 0,
        flt: SearchFilter | None = None,
        version: str | None = None,
        exact: bool = True,
        oversampling: float = DEFAULT_OVERSAMPLING,
    ) -> list[Hit]:
        """Top `limit` points by dot product after skipping `offset`, best first. exact=True scans
        every candidate, so the ranking equals numpy's exact one; exact=False scans the quantised
        copies and rescores `oversampling` times as many (see QUANTIZATION_QUANTILE). Scores
        returned are always the float32 dot products."""

    def search_expected(self) -> ContextManager[None]:
        """Context around the work that leads to a `search` from this thread: a backend that
        batches concurrent searches waits (briefly) for it instead of running without it."""

    def search_batch(
        self,
        vectors: np.ndarray,
        limit: int,
        filters: Sequence[SearchFilter | None] | None = None,
        version: str | None = None,
        exact: bool = True,
        oversampling: float = DEFAULT_OVERSAMPLING,
    ) -> list[list[Hit]]:
        """`search` for each row of `vectors` (filters aligned with the rows), in one engine call."""

    def get(self, anime_ids: Sequence[int], version: str | None = None, with_vectors: bool = False) -> list[ItemPoint]:
        """The points that exist among `anime_ids`, in the order asked."""

    def count(self, version: str | None = None) -> int: ...

    def upsert_users(self, version: str, dim: int, users: Sequence[UserPoint]) -> None:
        """Insert or replace user vectors in `version`'s users collection (created with `dim` on
        first use); durable and readable by every process on the same storage when this returns."""

    def get_users(self, version: str, user_ids: Sequence[int]) -> list[UserPoint]:
        """The stored users among `user_ids` (with vectors), in the order asked; none when the
        version has no users collection yet."""

    def count_users(self, version: str) -> int:
        """Users stored for `version` (0 when none)."""

    def delete_version(self, version: str) -> None:
        """Drop a version's collection; refuses (VersionInUse) the alias target."""

    def close(self) -> None: ...


# ---- helpers shared by the backends -------------------------------------------------------------


def check_version(version: object) -> str:
    """Versions become directory and collection names, so keep them to a safe alphabet."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"invalid index version {version!r}: use 1-100 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    return version


def as_query_vector(vector: np.ndarray) -> list[float]:
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or not np.isfinite(v).all():
        raise ValueError(f"query vector must be 1-D and finite, got shape {v.shape}")
    return v.tolist()


def as_query_matrix(vectors: np.ndarray) -> list[list[float]]:
    m = np.asarray(vectors, dtype=np.float32)
    if m.ndim != 2 or not np.isfinite(m).all():
        raise ValueError(f"query vectors must be a finite 2-D array, got shape {m.shape}")
    return m.tolist()


def stored_user(user: UserPoint, dim: int) -> tuple[int, list[float], dict[str, Any]]:
    """Validate one user point: (id, vector, payload) as stored."""
    user_id = int(user.user_id)
    if user_id < 0:
        raise ValueError(f"user_id must be >= 0 (Qdrant point ids are unsigned), got {user_id}")
    v = np.asarray(user.vector, dtype=np.float32)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise ValueError(f"user {user_id}: vector must be finite with shape ({dim},), got {v.shape}")
    return user_id, v.tolist(), {**{k: _plain(x) for k, x in user.payload.items()}, "user_id": user_id}


# A point as an engine returns it: (id, vector or None, payload or None). The ids are the ints we
# stored, which the clients type as int | str | UUID; the vector is whatever np.asarray reads.
StoredRecord = tuple[SupportsInt | str, Any, dict | None]


def ordered_users(records: Iterable[StoredRecord], user_ids: Sequence[int]) -> list[UserPoint]:
    by_id = {int(i): UserPoint(int(i), np.asarray(v, np.float32), dict(p or {})) for i, v, p in records}
    return [by_id[int(u)] for u in user_ids if int(u) in by_id]


# A few excluded ids (a favourites query's liked anime) are cheaper to drop from a slightly longer
# list than to push into the engine as a must-not condition, which turns a plain scan into a filtered
# one (p50 +0.7 ms, p99 +7 ms at 16k items, measured). The top (offset + limit) after dropping n ids
# is always within the top (offset + limit + n), so pages stay exact. More ids go to the engine.
POST_FILTER_MAX_IDS = 64


@dataclass(frozen=True)
class Fetch:
    """What to ask the engine for one page, and what to drop from its answer."""

    flt: SearchFilter | None
    limit: int
    offset: int
    drop: frozenset[int]
    page: slice

    def apply(self, hits: list["Hit"]) -> list["Hit"]:
        if not self.drop:
            return hits
        return [h for h in hits if h.anime_id not in self.drop][self.page]


def plan_fetch(flt: SearchFilter | None, limit: int, offset: int) -> Fetch:
    ids = flt.exclude_ids if flt is not None else ()
    if flt is None or not ids or len(ids) > POST_FILTER_MAX_IDS:
        return Fetch(flt, limit, offset, frozenset(), slice(None))
    rest = replace(flt, exclude_ids=())
    pushed = None if rest == SearchFilter() else rest
    return Fetch(
        pushed, offset + limit + len(set(ids)), 0, frozenset(int(i) for i in ids), slice(offset, offset + limit)
    )


def check_page(limit: int, offset: int, oversampling: float = DEFAULT_OVERSAMPLING) -> None:
    if limit < 1 or offset < 0:
        raise ValueError(f"need limit >= 1 and offset >= 0, got limit={limit} offset={offset}")
    if not oversampling >= 1.0:
        raise ValueError(f"oversampling must be >= 1, got {oversampling}")


def aligned_filters(filters: Sequence[SearchFilter | None] | None, n: int) -> list[SearchFilter | None]:
    if filters is None:
        return [None] * n
    if len(filters) != n:
        raise ValueError(f"{len(filters)} filters for {n} query vectors")
    return list(filters)


def stored_point(point: ItemPoint, dim: int) -> tuple[int, list[float], dict[str, Any]]:
    """Validate one point and give (id, vector, payload as stored). Validation happens before any
    write so that a bad point fails its whole batch instead of leaving it half-applied."""
    anime_id = int(point.anime_id)
    if anime_id < 0:
        raise ValueError(f"anime_id must be >= 0 (Qdrant point ids are unsigned), got {anime_id}")
    if point.vector is None:
        raise ValueError(f"anime {anime_id}: missing vector")
    v = np.asarray(point.vector, dtype=np.float32)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise ValueError(f"anime {anime_id}: vector must be finite with shape ({dim},), got {v.shape}")
    payload = {k: _plain(x) for k, x in point.payload.items() if k not in _DERIVED}
    payload["anime_id"] = anime_id
    payload[GENRES_KEY] = folded(payload.get("genres") or [])
    kind = payload.get("type")
    payload[TYPE_KEY] = str(kind).casefold() if kind is not None else None
    return anime_id, v.tolist(), payload


def payload_matches(payload: dict[str, Any], flt: SearchFilter) -> bool:
    """Whether one anime's payload passes `flt`: the engine's condition (edge.py's edge_filter), in
    Python, for the few anime a caller scores outside the engine (the ranker's added anime)."""
    genres = set(folded(payload.get("genres") or []))
    if flt.include_genres and not genres & set(folded(flt.include_genres)):
        return False
    if flt.exclude_genres and genres & set(folded(flt.exclude_genres)):
        return False
    kind = payload.get("type")
    if flt.types and (kind is None or str(kind).casefold() not in folded(flt.types)):
        return False
    year = payload.get("year")
    if flt.year_min is not None and (year is None or year < flt.year_min):
        return False
    if flt.year_max is not None and (year is None or year > flt.year_max):
        return False
    if flt.cold_only and not bool(payload.get(COLD_KEY)):
        return False
    return int(payload["anime_id"]) not in set(flt.exclude_ids)


def folded(values: Iterable[Any]) -> list[str]:
    """The case-folded form filters match against (see GENRES_KEY)."""
    return sorted({str(v).casefold() for v in values})


def public_payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    return {k: x for k, x in (payload or {}).items() if k not in _DERIVED}


def ordered_points(records: Iterable[StoredRecord], anime_ids: Sequence[int]) -> list[ItemPoint]:
    by_id = {
        int(i): ItemPoint(int(i), None if v is None else np.asarray(v, np.float32), public_payload(p))
        for i, v, p in records
    }
    return [by_id[int(a)] for a in anime_ids if int(a) in by_id]


def batched(points: Iterable[ItemPoint], size: int) -> Iterator[list[ItemPoint]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    chunk: list[ItemPoint] = []
    for p in points:
        chunk.append(p)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def timed(hook: QueryHook | None, operation: str) -> Iterator[None]:
    """Report the call's duration to `hook`, failed calls included (a slow timeout is latency too)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if hook is not None:
            hook(operation, time.perf_counter() - start)


def _plain(x: Any) -> Any:
    """Payloads often come from pandas rows: turn numpy scalars/arrays into JSON-native values."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and x != x:  # NaN: pandas' missing value, not JSON
        return None
    if isinstance(x, (list, tuple)):
        return [_plain(e) for e in x]
    return x

"""Embedded backend: the Qdrant engine in-process through qdrant-edge (no server to run).

Layout under the root directory:
    aliases.json               {"anime2vec_items": "<version>"}, replaced atomically (os.replace)
    versions/<version>/shard/  the qdrant-edge shard (segments + WAL)
    versions/<version>/meta.json  written last: a version directory without it is not a version
    versions/.build-*          a build in progress (renamed into place only when complete)
    users/<version>/shard/     users updated online for that version (see `upsert_users`), created
    users/<version>/meta.json  on first use; derived data, rebuilt from the feedback store if lost

Concurrency, as measured on qdrant-edge 0.9: an EdgeShard call holds the GIL for its whole duration,
so calls from many threads are serialised by the GIL itself and concurrent search + upsert is safe
without a lock of ours (it also means a search blocks other Python threads for its few
milliseconds). Searches that arrive while one runs are therefore coalesced into one
`query_batch` (anime2vec/index/coalesce.py), which shares one pass over the vectors. The lock
below guards only our own state: the table of open shards and the version directories. A shard
directory is locked by the engine to the one process (and the one EdgeShard) that opened it, so
shards open lazily on first use: an offline `index` command can build and promote a new version
beside a running ranker, which follows the alias on its next call.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from anime2vec.index.base import (
    ALIAS,
    COLD_KEY,
    DEFAULT_OVERSAMPLING,
    GENRES_KEY,
    QUANTIZATION_QUANTILE,
    TYPE_KEY,
    AliasUnreadable,
    Hit,
    IndexUnavailable,
    ItemPoint,
    QueryHook,
    SearchFilter,
    UnknownVersion,
    UserPoint,
    VersionExists,
    VersionInUse,
    aligned_filters,
    as_query_matrix,
    as_query_vector,
    batched,
    check_page,
    check_version,
    effective_oversampling,
    folded,
    ordered_points,
    ordered_users,
    plan_fetch,
    public_payload,
    stored_point,
    stored_user,
    timed,
)
from anime2vec.index.coalesce import Coalescer
from anime2vec.index.shard_check import IN_USE, ShardHealth, check_shard

_INDEXED_FIELDS = (
    (GENRES_KEY, qe.PayloadSchemaType.Keyword),
    (TYPE_KEY, qe.PayloadSchemaType.Keyword),
    ("year", qe.PayloadSchemaType.Integer),
    (COLD_KEY, qe.PayloadSchemaType.Bool),
)


def edge_filter(flt: SearchFilter | None) -> qe.Filter | None:
    """SearchFilter → engine filter (evaluated inside the search, using the payload indexes)."""
    if flt is None:
        return None
    must: list = []
    must_not: list = []
    if flt.include_genres:
        must.append(qe.FieldCondition(GENRES_KEY, match=qe.MatchAny(folded(flt.include_genres))))
    if flt.exclude_genres:
        must_not.append(qe.FieldCondition(GENRES_KEY, match=qe.MatchAny(folded(flt.exclude_genres))))
    if flt.types:
        must.append(qe.FieldCondition(TYPE_KEY, match=qe.MatchAny(folded(flt.types))))
    if flt.year_min is not None or flt.year_max is not None:
        must.append(qe.FieldCondition("year", range=qe.RangeFloat(gte=flt.year_min, lte=flt.year_max)))
    if flt.exclude_ids:
        must_not.append(qe.HasIdCondition({int(i) for i in flt.exclude_ids}))
    if flt.cold_only:
        # np.True_, not True: qdrant-edge 0.9 reads a Python bool as the integer 1 (bool is an int
        # subclass), which never matches the stored boolean; numpy's bool converts to a boolean.
        # (qdrant-edge's stubs accept only str | int | bool here.)
        must.append(qe.FieldCondition(COLD_KEY, match=qe.MatchValue(np.True_)))  # type: ignore[arg-type]
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


class EdgeItemIndex:
    """ItemIndex on qdrant-edge shards under `root` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        on_query: QueryHook | None = None,
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ):
        """max_batch: at most this many concurrent searches share one engine call (1: none do);
        on_batch(size) observes each engine call's number of searches."""
        self._root = Path(root)
        self._searches: Coalescer[str, qe.QueryRequest, list[qe.ScoredPoint]] = Coalescer(
            self._query_many, max_batch, on_batch=on_batch
        )
        self._versions_dir = self._root / "versions"
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        self._alias_file = self._root / "aliases.json"
        self._on_query = on_query
        self._lock = threading.Lock()
        self._shards: dict[str, qe.EdgeShard] = {}
        self._dims: dict[str, int] = {}
        self._users_dir = self._root / "users"
        self._user_shards: dict[str, tuple[qe.EdgeShard, int]] = {}
        self._alias_seen: tuple[tuple[int, int, int] | None, str | None] = (None, None)
        self._closed = False

    # ---- versions and alias ----

    def create_version(
        self, version: str, dim: int, points: Iterable[ItemPoint], batch: int = 1024, overwrite: bool = False
    ) -> int:
        check_version(version)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if self.has_version(version):
            if not overwrite:
                raise VersionExists(f"index version {version} already exists (pass overwrite=True to rebuild)")
            if version == self.alias_target():
                raise VersionInUse(f"index version {version} is the alias target; promote another first")
        build = self._versions_dir / f".build-{version}-{uuid.uuid4().hex[:8]}"
        shard = qe.EdgeShard.create(str(build / "shard"), _items_config(dim))
        try:
            for name, schema in _INDEXED_FIELDS:
                shard.update(qe.UpdateOperation.create_field_index(name, schema))
            written = 0
            for chunk in batched(points, batch):
                shard.update(qe.UpdateOperation.upsert_points([qe.Point(*stored_point(p, dim)) for p in chunk]))
                written += len(chunk)
            shard.optimize()  # seals the segment and builds its int8 copies (quantised search)
            shard.close()  # flushes; the directory is only moved once nothing holds it
            _write_json(
                build / "meta.json",
                {
                    "version": version,
                    "dim": dim,
                    "points": written,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            self._install(version, build, overwrite)
            return written
        except BaseException:
            shard.close()
            shutil.rmtree(build, ignore_errors=True)
            raise

    def _install(self, version: str, build: Path, overwrite: bool) -> None:
        """Move a complete build into place, replacing an existing version only when allowed."""
        final = self._versions_dir / version
        with self._lock:
            if not final.exists():
                os.rename(build, final)
                return
            if not overwrite:  # another process built it meanwhile
                raise VersionExists(f"index version {version} already exists (pass overwrite=True to rebuild)")
            trash = self._retire(version)
            os.rename(build, final)
        shutil.rmtree(trash, ignore_errors=True)

    def has_version(self, version: str) -> bool:
        return (self._versions_dir / check_version(version) / "meta.json").is_file()

    def versions(self) -> list[str]:
        return sorted(
            p.name for p in self._versions_dir.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()
        )

    def set_alias(self, version: str) -> None:
        if not self.has_version(version):
            raise UnknownVersion(f"no index version {version} to promote; have {self.versions()}")
        _write_json(self._alias_file, {ALIAS: version})

    def alias_target(self) -> str | None:
        """Re-read when aliases.json changes (another process may promote), else cached."""
        try:
            st = os.stat(self._alias_file)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen_key, target = self._alias_seen
        if key != seen_key:
            target = _read_alias(self._alias_file)
            self._alias_seen = (key, target)
        return target

    @property
    def alias_file(self) -> Path:
        return self._alias_file

    # ---- start-up checks (services/ranker/recovery.py) ----

    def version_dir(self, version: str) -> Path:
        return self._versions_dir / check_version(version)

    def users_dir(self, version: str) -> Path:
        return self._users_dir / check_version(version)

    def check_stored_version(self, version: str) -> ShardHealth:
        """Whether the stored collection of `version` can be served: its meta.json reads and its
        shard opens and reads back, in a child process (anime2vec/index/shard_check.py). A
        directory without meta.json is a damaged version too (builds are renamed into place whole).
        Call before this process opens the version."""
        return _check_dir(self.version_dir(version), with_points=True)

    def check_stored_users(self, version: str) -> ShardHealth:
        """The same for the users collection of `version` (sound when there is none yet)."""
        return _check_dir(self.users_dir(version), with_points=False)

    def delete_version(self, version: str) -> None:
        if not self.has_version(version):
            raise UnknownVersion(f"no index version {version}")
        if version == self.alias_target():
            raise VersionInUse(f"index version {version} is the alias target; promote another first")
        with self._lock:
            trash = self._retire(version)
        shutil.rmtree(trash, ignore_errors=True)

    def _retire(self, version: str) -> Path:
        """Close our shard of `version` and move its directory aside (caller holds the lock and
        deletes the returned path). Refuses while another process holds the shard: deleting files
        under a live reader would only surface as its errors later."""
        path = self._versions_dir / version
        shard = self._shards.pop(version, None)
        self._dims.pop(version, None)
        if shard is None:
            try:
                shard = _load_shard(path / "shard")
            except IndexUnavailable as e:
                if IN_USE in str(e):
                    raise VersionInUse(f"index version {version} is open in another process: {e}") from e
                shard = None  # damaged beyond opening: nothing holds it, move it aside all the same
        if shard is not None:
            shard.close()
        trash = self._versions_dir / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        return trash

    # ---- data plane ----

    def upsert(self, points: Sequence[ItemPoint], version: str | None = None) -> None:
        shard, dim = self._open(version)
        ops = [qe.Point(*stored_point(p, dim)) for p in points]
        if not ops:
            return
        with timed(self._on_query, "upsert"):
            shard.update(qe.UpdateOperation.upsert_points(ops))
            shard.flush()  # new anime are rare and must survive a crash, not just a clean close

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
        check_page(limit, offset, oversampling)
        fetch = plan_fetch(flt, limit, offset)
        request = _query(as_query_vector(vector), fetch.limit, fetch.offset, fetch.flt, exact, oversampling)
        if version is None:
            version = self._alias_or_raise()
        self._open(version)  # UnknownVersion / IndexUnavailable here, in the caller's own thread
        with timed(self._on_query, "search"):  # includes any wait for a running batch
            found = self._searches.run(version, request)
        return fetch.apply([_hit(p) for p in found])

    def search_expected(self):
        """Context: a search from this thread is coming; concurrent searches wait for it (briefly)
        so that they run as one batch."""
        return self._searches.expect()

    def _query_many(self, version: str, requests: Sequence[qe.QueryRequest]) -> list[list[qe.ScoredPoint]]:
        shard, _ = self._open(version)
        if len(requests) == 1:
            return [shard.query(requests[0])]
        return shard.query_batch(qe.QueryBatchRequest(list(requests)))

    def search_batch(
        self,
        vectors: np.ndarray,
        limit: int,
        filters: Sequence[SearchFilter | None] | None = None,
        version: str | None = None,
        exact: bool = True,
        oversampling: float = DEFAULT_OVERSAMPLING,
    ) -> list[list[Hit]]:
        rows = as_query_matrix(vectors)
        requests = [
            _query(v, limit, 0, f, exact, oversampling) for v, f in zip(rows, aligned_filters(filters, len(rows)))
        ]
        if not requests:
            return []
        shard, _ = self._open(version)
        with timed(self._on_query, "search_batch"):
            found = shard.query_batch(qe.QueryBatchRequest(requests))
        return [[_hit(p) for p in ps] for ps in found]

    def get(self, anime_ids: Sequence[int], version: str | None = None, with_vectors: bool = False) -> list[ItemPoint]:
        shard, _ = self._open(version)
        with timed(self._on_query, "get"):
            records = shard.retrieve([int(a) for a in anime_ids], True, with_vectors)
        return ordered_points(((r.id, r.vector if with_vectors else None, r.payload) for r in records), anime_ids)

    def count(self, version: str | None = None) -> int:
        shard, _ = self._open(version)
        with timed(self._on_query, "count"):
            return shard.count(qe.CountRequest(exact=True))

    # ---- users (online updates) ----

    def upsert_users(self, version: str, dim: int, users: Sequence[UserPoint]) -> None:
        if not users:
            return
        shard, have = self._open_users(version, dim)
        if have != dim:
            raise ValueError(f"users of {version} have dim {have}, got {dim}")
        ops = [qe.Point(*stored_user(u, dim)) for u in users]
        with timed(self._on_query, "upsert_users"):
            shard.update(qe.UpdateOperation.upsert_points(ops))
            shard.flush()  # another replica (or this one after a crash) must read what we wrote

    def get_users(self, version: str, user_ids: Sequence[int]) -> list[UserPoint]:
        opened = self._open_users(version, None)
        if opened is None:
            return []
        with timed(self._on_query, "get_users"):
            records = opened[0].retrieve([int(u) for u in user_ids], True, True)
        return ordered_users(((r.id, r.vector, r.payload) for r in records), user_ids)

    def count_users(self, version: str) -> int:
        opened = self._open_users(version, None)
        return 0 if opened is None else opened[0].count(qe.CountRequest(exact=True))

    def _open_users(self, version: str, dim: int | None):
        """The users shard of `version`, opened (or, given `dim`, created) on first use; None if it
        does not exist and dim is None."""
        check_version(version)
        with self._lock:
            if self._closed:
                raise IndexUnavailable("the index is closed")
            if version in self._user_shards:
                return self._user_shards[version]
            path = self._users_dir / version
            try:
                if (path / "meta.json").is_file():
                    opened = (_load_shard(path / "shard"), int(json.loads((path / "meta.json").read_text())["dim"]))
                elif dim is None:
                    return None
                else:  # a directory without meta.json is a creation that crashed: start over
                    shutil.rmtree(path, ignore_errors=True)
                    shard = qe.EdgeShard.create(
                        str(path / "shard"),
                        qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Dot)),
                    )
                    _write_json(path / "meta.json", {"version": version, "dim": dim})
                    opened = (shard, dim)
            except Exception as e:  # a held lock is the usual cause
                raise IndexUnavailable(f"cannot open the users of {version} at {path}: {e}") from e
            self._user_shards[version] = opened
            return opened

    def close(self) -> None:
        with self._lock:
            self._closed = True
            shards, self._shards = list(self._shards.values()), {}
            shards += [s for s, _ in self._user_shards.values()]
            self._user_shards = {}
            for shard in shards:
                shard.close()

    def _alias_or_raise(self) -> str:
        version = self.alias_target()
        if version is None:
            raise UnknownVersion("no index version has been promoted (the alias is unset)")
        return version

    def _open(self, version: str | None) -> tuple[qe.EdgeShard, int]:
        """The shard of `version` (None: the alias target), opened on first use."""
        if version is None:
            version = self._alias_or_raise()
        with self._lock:
            if self._closed:
                raise IndexUnavailable("the index is closed")
            shard = self._shards.get(version)
            if shard is not None:
                return shard, self._dims[version]
            if not self.has_version(version):
                raise UnknownVersion(f"no index version {version}; have {self.versions()}")
            path = self._versions_dir / version
            try:
                shard = _load_shard(path / "shard")
            except IndexUnavailable as e:  # a held lock is the usual cause
                raise IndexUnavailable(f"cannot open index version {version} at {path}: {e}") from e
            self._shards[version] = shard
            self._dims[version] = int(json.loads((path / "meta.json").read_text())["dim"])
            return shard, self._dims[version]


def _items_config(dim: int) -> qe.EdgeConfig:
    """Dot-product vectors with int8 copies, and no HNSW graph (m=0): at catalogue sizes a scan of
    the int8 copies beats the graph on both latency and recall for these vectors (bench/search.py).
    indexing_threshold=1 KB lets `optimize` seal any non-empty segment, which is what builds the
    copies; points upserted later (added anime) land in an appendable segment scanned in float32."""
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(
            size=dim,
            distance=qe.Distance.Dot,
            quantization_config=qe.ScalarQuantizationConfig(
                qe.ScalarType.Int8, quantile=QUANTIZATION_QUANTILE, always_ram=True
            ),
        ),
        hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
    )


def _query(
    vector: list[float], limit: int, offset: int, flt: SearchFilter | None, exact: bool, oversampling: float
) -> qe.QueryRequest:
    check_page(limit, offset, oversampling)
    params = (
        qe.SearchParams(exact=True)
        if exact
        else qe.SearchParams(
            exact=False,
            quantization=qe.QuantizationSearchParams(
                rescore=True, oversampling=effective_oversampling(limit, offset, oversampling)
            ),
        )
    )
    return qe.QueryRequest(
        limit=limit,
        offset=offset,
        query=qe.Query.Nearest(vector),
        filter=edge_filter(flt),
        params=params,
        with_payload=True,
    )


def _hit(p: qe.ScoredPoint) -> Hit:
    return Hit(int(p.id), float(p.score), public_payload(p.payload))


def _load_shard(path: Path) -> qe.EdgeShard:
    """EdgeShard.load with the engine's failures as IndexUnavailable: it raises bare Exception, and
    a Rust panic (damaged files) arrives as pyo3's PanicException, which is a BaseException."""
    try:
        return qe.EdgeShard.load(str(path))
    except BaseException as e:  # noqa: B902
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        raise IndexUnavailable(f"{type(e).__name__}: {e}") from e


def read_alias_file(path: Path) -> str | None:
    """The version an embedded index's aliases.json at `path` names (None: none, or no file);
    AliasUnreadable when it does not name one. For a ranker following another data dir's alias."""
    return _read_alias(path)


def _read_alias(path: Path) -> str | None:
    """The version aliases.json names (None: it names none); AliasUnreadable when it is not a
    JSON object whose alias is a version name."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise AliasUnreadable(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:100]})") from e
    target = doc.get(ALIAS) if isinstance(doc, dict) else None
    if isinstance(doc, dict) and target is None:
        return None
    try:
        return check_version(target)
    except ValueError:
        raise AliasUnreadable(f"{path} does not name a version: {json.dumps(doc)[:100]}") from None


def _check_dir(path: Path, with_points: bool) -> ShardHealth:
    if not path.exists():
        return ShardHealth()
    try:
        meta = json.loads((path / "meta.json").read_text())
        dim, points = int(meta["dim"]), int(meta["points"]) if with_points else 0
    except FileNotFoundError:
        return ShardHealth("its meta.json is missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return ShardHealth(f"its meta.json is unreadable ({type(e).__name__}: {str(e)[:100]})")
    return check_shard(path / "shard", dim, points)


def _write_json(path: Path, obj: dict) -> None:
    """Write-then-rename so readers (maybe in another process) see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

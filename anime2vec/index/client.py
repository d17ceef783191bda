"""Server backend: a Qdrant server or cluster through qdrant-client (used when QDRANT_URL is set).

Each version is a real collection `anime2vec_items_<version>`; the alias `anime2vec_items` points at
the served one and is switched with one `update_collection_aliases` request (delete + create), which
Qdrant applies atomically. Calls with version=None go to the alias name itself, so the server
resolves it per request. A collection carries metadata {"anime2vec_complete": bool} (collection
metadata needs Qdrant >= 1.16): it is created false and set true only after every point is written,
so a build that crashed half-way is never listed, promoted or searched as a version.

qdrant-client's local mode (`QdrantClient(path=...)` / `":memory:"`) runs the same calls, aliases
included; it ignores payload indexes and search params (it always scans exactly) and warns so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from anime2vec.index.base import (
    ALIAS,
    COLD_KEY,
    COLLECTION_PREFIX,
    DEFAULT_OVERSAMPLING,
    GENRES_KEY,
    QUANTIZATION_QUANTILE,
    TYPE_KEY,
    USERS_PREFIX,
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

_COMPLETE = "anime2vec_complete"
_INDEXED_FIELDS = (
    (GENRES_KEY, models.PayloadSchemaType.KEYWORD),
    (TYPE_KEY, models.PayloadSchemaType.KEYWORD),
    ("year", models.PayloadSchemaType.INTEGER),
    (COLD_KEY, models.PayloadSchemaType.BOOL),
)


def client_filter(flt: SearchFilter | None) -> models.Filter | None:
    """SearchFilter → Qdrant filter (evaluated by the server inside the search)."""
    if flt is None:
        return None
    must: list = []
    must_not: list = []
    if flt.include_genres:
        must.append(models.FieldCondition(key=GENRES_KEY, match=models.MatchAny(any=folded(flt.include_genres))))
    if flt.exclude_genres:
        must_not.append(models.FieldCondition(key=GENRES_KEY, match=models.MatchAny(any=folded(flt.exclude_genres))))
    if flt.types:
        must.append(models.FieldCondition(key=TYPE_KEY, match=models.MatchAny(any=folded(flt.types))))
    if flt.year_min is not None or flt.year_max is not None:
        must.append(models.FieldCondition(key="year", range=models.Range(gte=flt.year_min, lte=flt.year_max)))
    if flt.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=sorted({int(i) for i in flt.exclude_ids})))
    if flt.cold_only:
        must.append(models.FieldCondition(key=COLD_KEY, match=models.MatchValue(value=True)))
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def collection_name(version: str) -> str:
    return COLLECTION_PREFIX + check_version(version)


def users_collection_name(version: str) -> str:
    return USERS_PREFIX + check_version(version)


class QdrantItemIndex:
    """ItemIndex on a Qdrant server (or qdrant-client local mode in tests). Thread-safe as far as
    qdrant-client is: its HTTP client is shared by all threads."""

    def __init__(self, client: QdrantClient, on_query: QueryHook | None = None):
        self._client = client
        self._on_query = on_query

    @classmethod
    def connect(
        cls, url: str, api_key: str | None = None, timeout_s: float = 5.0, on_query: QueryHook | None = None
    ) -> "QdrantItemIndex":
        """Connect and make one request now, so a wrong or dead URL fails at start-up with
        IndexUnavailable (within about timeout_s) rather than on the first user request."""
        client = QdrantClient(url=url, api_key=api_key, timeout=max(1, math.ceil(timeout_s)), check_compatibility=False)
        index = cls(client, on_query)
        try:
            with index._reachable():
                client.get_collections()
        except IndexUnavailable as e:  # say which server: the start-up log line is all an operator sees
            raise IndexUnavailable(f"{e} (Qdrant URL {_without_credentials(url)}, timeout {timeout_s:g} s)") from e
        return index

    # ---- versions and alias ----

    def create_version(
        self, version: str, dim: int, points: Iterable[ItemPoint], batch: int = 1024, overwrite: bool = False
    ) -> int:
        name = collection_name(version)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        with self._reachable():
            if self._client.collection_exists(name):
                if self.has_version(version):  # else a crashed build: replace it silently
                    if not overwrite:
                        raise VersionExists(f"index version {version} already exists (pass overwrite=True to rebuild)")
                    if version == self.alias_target():
                        raise VersionInUse(f"index version {version} is the alias target; promote another first")
                self._client.delete_collection(name)
            # int8 copies and no HNSW graph, as the embedded backend (edge._items_config)
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT),
                quantization_config=models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=QUANTIZATION_QUANTILE, always_ram=True
                    )
                ),
                hnsw_config=models.HnswConfigDiff(m=0),
                metadata={_COMPLETE: False},
            )
        try:
            with self._reachable():
                for field, schema in _INDEXED_FIELDS:
                    self._client.create_payload_index(name, field, schema)
                written = 0
                for chunk in batched(points, batch):
                    self._client.upsert(name, self._structs(chunk, dim), wait=True)
                    written += len(chunk)
                self._client.update_collection(name, metadata={_COMPLETE: True})
            return written
        except BaseException:
            try:
                self._client.delete_collection(name)
            except Exception:  # the original failure is the one to report
                pass
            raise

    def has_version(self, version: str) -> bool:
        name = collection_name(version)
        with self._reachable():
            if not self._client.collection_exists(name):
                return False
            metadata = self._client.get_collection(name).config.metadata or {}
        return metadata.get(_COMPLETE) is True

    def versions(self) -> list[str]:
        with self._reachable():
            names = [c.name for c in self._client.get_collections().collections]
        candidates = [n[len(COLLECTION_PREFIX) :] for n in names if n.startswith(COLLECTION_PREFIX)]
        return sorted(v for v in candidates if self.has_version(v))

    def set_alias(self, version: str) -> None:
        if not self.has_version(version):
            raise UnknownVersion(f"no index version {version} to promote; have {self.versions()}")
        with self._reachable():
            self._client.update_collection_aliases(
                change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=ALIAS)),
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(collection_name=collection_name(version), alias_name=ALIAS)
                    ),
                ]
            )

    def alias_target(self) -> str | None:
        with self._reachable():
            aliases = self._client.get_aliases().aliases
        for a in aliases:
            if a.alias_name == ALIAS and a.collection_name.startswith(COLLECTION_PREFIX):
                return a.collection_name[len(COLLECTION_PREFIX) :]
        return None

    def delete_version(self, version: str) -> None:
        name = collection_name(version)
        if version == self.alias_target():
            raise VersionInUse(f"index version {version} is the alias target; promote another first")
        with self._reachable():
            if not self._client.collection_exists(name):
                raise UnknownVersion(f"no index version {version}")
            self._client.delete_collection(name)

    # ---- data plane ----

    def upsert(self, points: Sequence[ItemPoint], version: str | None = None) -> None:
        if not points:
            return
        target = self._target(version)
        with self._serving(version):
            dim = _vector_size(self._client.get_collection(target))
        structs = self._structs(points, dim)
        with timed(self._on_query, "upsert"), self._serving(version):
            self._client.upsert(target, structs, wait=True)

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
        query = as_query_vector(vector)
        check_page(limit, offset, oversampling)
        fetch = plan_fetch(flt, limit, offset)
        with timed(self._on_query, "search"), self._serving(version):
            found = self._client.query_points(
                self._target(version),
                query=query,
                limit=fetch.limit,
                offset=fetch.offset,
                query_filter=client_filter(fetch.flt),
                search_params=_params(exact, oversampling, fetch.limit, fetch.offset),
                with_payload=True,
            ).points
        return fetch.apply([_hit(p) for p in found])

    def search_expected(self):
        """No batching here: the client's calls release the GIL, so concurrent searches overlap."""
        return nullcontext()

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
        check_page(limit, 0, oversampling)
        requests = [
            models.QueryRequest(
                query=v,
                limit=limit,
                filter=client_filter(f),
                params=_params(exact, oversampling, limit, 0),
                with_payload=True,
            )
            for v, f in zip(rows, aligned_filters(filters, len(rows)))
        ]
        if not requests:
            return []
        with timed(self._on_query, "search_batch"), self._serving(version):
            found = self._client.query_batch_points(self._target(version), requests=requests)
        return [[_hit(p) for p in r.points] for r in found]

    def get(self, anime_ids: Sequence[int], version: str | None = None, with_vectors: bool = False) -> list[ItemPoint]:
        with timed(self._on_query, "get"), self._serving(version):
            records = self._client.retrieve(
                self._target(version), ids=[int(a) for a in anime_ids], with_payload=True, with_vectors=with_vectors
            )
        return ordered_points(((r.id, r.vector if with_vectors else None, r.payload) for r in records), anime_ids)

    def count(self, version: str | None = None) -> int:
        with timed(self._on_query, "count"), self._serving(version):
            return self._client.count(self._target(version), exact=True).count

    # ---- users (online updates) ----

    def upsert_users(self, version: str, dim: int, users: Sequence[UserPoint]) -> None:
        if not users:
            return
        name = users_collection_name(version)
        with self._reachable():
            if not self._client.collection_exists(name):
                try:
                    self._client.create_collection(
                        name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT)
                    )
                except Exception:
                    if not self._client.collection_exists(name):  # else another replica made it first
                        raise
            have = _vector_size(self._client.get_collection(name))
        if have != dim:
            raise ValueError(f"users of {version} have dim {have}, got {dim}")
        structs = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in (stored_user(u, dim) for u in users)]
        with timed(self._on_query, "upsert_users"), self._reachable():
            self._client.upsert(name, structs, wait=True)

    def get_users(self, version: str, user_ids: Sequence[int]) -> list[UserPoint]:
        name = users_collection_name(version)
        try:
            with timed(self._on_query, "get_users"), self._reachable():
                records = self._client.retrieve(
                    name, ids=[int(u) for u in user_ids], with_payload=True, with_vectors=True
                )
        except IndexUnavailable:
            raise
        except Exception:
            # looked up only after a failure, so the usual hit is one request
            with self._reachable():
                if not self._client.collection_exists(name):
                    return []
            raise
        return ordered_users(((r.id, r.vector, r.payload) for r in records), user_ids)

    def count_users(self, version: str) -> int:
        name = users_collection_name(version)
        with self._reachable():
            if not self._client.collection_exists(name):
                return 0
            return self._client.count(name, exact=True).count

    def close(self) -> None:
        self._client.close()

    # ---- internals ----

    def _target(self, version: str | None) -> str:
        """The alias itself for the served version: the server resolves it atomically per request."""
        return ALIAS if version is None else collection_name(version)

    @staticmethod
    def _structs(points: Sequence[ItemPoint], dim: int) -> list[models.PointStruct]:
        structs = []
        for p in points:
            anime_id, vector, payload = stored_point(p, dim)
            structs.append(models.PointStruct(id=anime_id, vector=vector, payload=payload))
        return structs

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Transport failures, an overloaded or failing server and rejected credentials all mean
        the index cannot serve: IndexUnavailable."""
        try:
            yield
        except ResponseHandlingException as e:
            raise IndexUnavailable(f"Qdrant is unreachable: {e}") from e
        except UnexpectedResponse as e:
            if e.status_code in (401, 403, 429) or (e.status_code is not None and e.status_code >= 500):
                raise IndexUnavailable(f"Qdrant cannot serve: {e}") from e
            raise

    @contextmanager
    def _serving(self, version: str | None) -> Iterator[None]:
        """As _reachable, and a failure on a version that turns out not to exist (or an unset
        alias) becomes UnknownVersion; looked up only after a failure, so hits cost nothing."""
        try:
            with self._reachable():
                yield
        except IndexUnavailable:
            raise
        except Exception as e:
            if self._missing(version):
                raise UnknownVersion(
                    f"no index version {version}"
                    if version is not None
                    else "no index version has been promoted (the alias is unset)"
                ) from e
            raise

    def _missing(self, version: str | None) -> bool:
        return self.alias_target() is None if version is None else not self.has_version(version)


def _vector_size(info: models.CollectionInfo) -> int:
    vectors = info.config.params.vectors
    assert isinstance(vectors, models.VectorParams)  # our collections hold one unnamed vector
    return vectors.size


def _params(exact: bool, oversampling: float, limit: int, offset: int) -> models.SearchParams:
    if exact:
        return models.SearchParams(exact=True)
    return models.SearchParams(
        exact=False,
        quantization=models.QuantizationSearchParams(
            rescore=True, oversampling=effective_oversampling(limit, offset, oversampling)
        ),
    )


def _hit(p: models.ScoredPoint) -> Hit:
    return Hit(int(p.id), float(p.score), public_payload(p.payload))

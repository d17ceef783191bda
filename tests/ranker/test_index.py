"""The ranker's Qdrant layer against both backends: qdrant-edge in a temporary directory and
qdrant-client's local mode (the same client calls a Qdrant server gets). Expected rankings come from
numpy's exact dot products; filter expectations are hand-listed id sets."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from qdrant_client import QdrantClient

from anime2vec.index.backends import open_index
from anime2vec.index.base import (
    IndexUnavailable,
    ItemIndex,
    ItemPoint,
    SearchFilter,
    UnknownVersion,
    VersionExists,
    VersionInUse,
    payload_matches,
)
from anime2vec.index.client import QdrantItemIndex
from anime2vec.index.edge import EdgeItemIndex

# Local mode warns that it ignores payload indexes and search params; the calls are still the server's.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]

DIM = 16


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    m = rng.standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def points_of(ids, vectors, payloads=None) -> list[ItemPoint]:
    payloads = payloads or [{"title": f"anime {i}"} for i in ids]
    return [ItemPoint(int(i), v, dict(p)) for i, v, p in zip(ids, vectors, payloads)]


def numpy_top(ids: np.ndarray, vectors: np.ndarray, q: np.ndarray, k: int, keep=None) -> tuple[list[int], np.ndarray]:
    """Exact top-k ids and scores, in float64, optionally restricted to the ids in `keep`."""
    scores = vectors.astype(np.float64) @ q.astype(np.float64)
    order = [j for j in np.argsort(-scores, kind="stable") if keep is None or int(ids[j]) in keep][:k]
    return [int(ids[j]) for j in order], scores[order]


@pytest.fixture(params=["edge", "client"])
def make_index(request, tmp_path) -> Iterator[Callable[[], ItemIndex]]:
    """make_index() opens the index stored in this test's directory (again, after a close). Local
    mode keeps it in memory unless persistent=True: its on-disk storage commits point by point."""
    opened: list[ItemIndex] = []

    def make(persistent: bool = False, **kw) -> ItemIndex:
        if request.param == "edge":
            index = EdgeItemIndex(tmp_path / "edge", **kw)
        else:
            client = QdrantClient(path=str(tmp_path / "local")) if persistent else QdrantClient(":memory:")
            index = QdrantItemIndex(client, **kw)
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close()


@pytest.fixture
def index(make_index) -> ItemIndex:
    return make_index()


@pytest.fixture
def random_items():
    rng = np.random.default_rng(7)
    ids = rng.choice(np.arange(1, 60_000), size=300, replace=False)
    return ids, unit_rows(rng, len(ids)), unit_rows(rng, 4)


def test_exact_search_matches_numpy_and_pages_are_disjoint(index, random_items):
    ids, vectors, queries = random_items
    assert index.create_version("v1", DIM, points_of(ids, vectors), batch=64) == len(ids)
    index.set_alias("v1")
    assert index.count() == len(ids)
    for q in queries:
        want_ids, want_scores = numpy_top(ids, vectors, q, 30)
        hits = index.search(q, limit=30)
        assert [h.anime_id for h in hits] == want_ids
        np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-4)
        assert hits[0].payload == {"title": f"anime {want_ids[0]}", "anime_id": want_ids[0]}
        pages = [index.search(q, limit=10, offset=off) for off in (0, 10, 20)]
        paged = [h.anime_id for page in pages for h in page]
        assert paged == want_ids and len(set(paged)) == 30


def clustered_items(n: int = 3000, dim: int = 64, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectors with structure like the served ones (clusters of related anime, uneven norms), and
    queries that are means of a few items, like a favourites query."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors *= rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
    queries = np.stack([vectors[rng.choice(n, 3, replace=False)].mean(axis=0) for _ in range(25)])
    return np.arange(1, n + 1), vectors, queries


def test_quantised_search_rescores_in_float32_and_finds_the_exact_top_k(index):
    """exact=False scans int8 copies then rescores: the scores must be the float32 dot products
    (an unrescored int8 score would be off by far more than 1e-4), and the ids the exact top-k
    (measured here: identical sets; 0.98 leaves room for a rounding swap at the boundary)."""
    ids, vectors, queries = clustered_items()
    index.create_version("v1", vectors.shape[1], points_of(ids, vectors))
    index.set_alias("v1")
    overlaps = []
    for q in queries:
        want_ids, _ = numpy_top(ids, vectors, q, 20)
        hits = index.search(q, limit=20, exact=False, oversampling=4.0)
        got = [h.anime_id for h in hits]
        np.testing.assert_allclose([h.score for h in hits], vectors[np.asarray(got) - 1] @ q, rtol=1e-5, atol=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        overlaps.append(len(set(got) & set(want_ids)) / 20)
        assert got[0] == want_ids[0]
    assert np.mean(overlaps) >= 0.98
    with pytest.raises(ValueError, match="oversampling"):
        index.search(queries[0], limit=5, exact=False, oversampling=0.5)


def test_quantised_search_sees_points_upserted_after_the_build_and_honours_filters(index):
    ids, vectors, queries = clustered_items(n=1000)
    payloads = [{"genres": ["Mecha" if i % 2 else "Drama"]} for i in ids]
    index.create_version("v1", vectors.shape[1], points_of(ids, vectors, payloads))
    index.set_alias("v1")
    q = queries[0]
    index.upsert([ItemPoint(90_001, q * 3.0, {"genres": ["Drama"]})])  # lands outside the sealed segment
    assert index.search(q, limit=1, exact=False)[0].anime_id == 90_001
    mecha = index.search(q, limit=10, exact=False, flt=SearchFilter(include_genres=["mecha"]))
    want, _ = numpy_top(ids, vectors, q, 10, keep={int(i) for i in ids if i % 2})
    assert [h.anime_id for h in mecha] == want


@pytest.mark.parametrize("exact", [True, False])
def test_pages_with_a_few_excluded_ids_equal_the_exact_filtered_pages(index, random_items, exact):
    """Few exclusions are dropped after the search (POST_FILTER_MAX_IDS), many go to the engine:
    both must give the exact filtered ranking on every page, also when the excluded ids are the
    best-scoring ones and when other conditions are pushed down beside them."""
    from anime2vec.index.base import POST_FILTER_MAX_IDS

    ids, vectors, queries = random_items
    payloads = [{"genres": ["Mecha" if i % 3 else "Drama"]} for i in ids]
    index.create_version("v1", DIM, points_of(ids, vectors, payloads))
    index.set_alias("v1")
    q = queries[1]
    ranked, _ = numpy_top(ids, vectors, q, len(ids))
    mecha = {int(i) for i in ids if i % 3}
    for n_excluded in (3, POST_FILTER_MAX_IDS + 6):
        excluded = ranked[:n_excluded:2] + ranked[-3:]  # the best, interleaved, and some worst
        for genres in ((), ("mecha",)):
            keep = (set(map(int, ids)) if not genres else mecha) - set(excluded)
            want = [a for a in ranked if a in keep][:40]
            flt = SearchFilter(include_genres=genres, exclude_ids=excluded)
            pages = [index.search(q, limit=10, offset=off, flt=flt, exact=exact) for off in (0, 10, 20, 30)]
            assert [h.anime_id for page in pages for h in page] == want, (n_excluded, genres)


def test_edge_builds_the_int8_copies_when_a_version_is_created(tmp_path):
    """The copies come from sealing the segment (`optimize`); without them quantised search would
    silently scan float32."""
    ids, vectors, _ = clustered_items(n=500)
    index = EdgeItemIndex(tmp_path / "edge")
    try:
        index.create_version("v1", vectors.shape[1], points_of(ids, vectors))
        shard, _ = index._open("v1")
        assert shard.info().indexed_vectors_count == len(ids)
    finally:
        index.close()


def test_search_batch_equals_single_searches(index, random_items):
    ids, vectors, queries = random_items
    index.create_version("v1", DIM, points_of(ids, vectors))
    index.set_alias("v1")
    filters = [None, SearchFilter(exclude_ids=[int(i) for i in ids[:150]]), None, SearchFilter()]
    batch = index.search_batch(queries, limit=5, filters=filters)
    singles = [index.search(q, limit=5, flt=f) for q, f in zip(queries, filters)]
    assert [[h.anime_id for h in hs] for hs in batch] == [[h.anime_id for h in hs] for hs in singles]
    assert all(h.anime_id not in set(ids[:150].tolist()) for h in batch[1])


# Hand-made catalogue: (id, genres, type, year). Casing varies on purpose (filters are case-insensitive).
CATALOGUE = [
    (1, ["Action", "Adventure"], "TV", 1998),
    (2, ["Comedy"], "TV", 2005),
    (3, ["Action", "Comedy"], "Movie", 2005),
    (4, ["Drama"], "OVA", None),
    (5, [], "TV", 2010),
    (6, ["Drama", "Romance"], "Movie", 2001),
    (7, ["sci-fi", "Action"], "ONA", 2020),
    (8, ["Comedy", "Romance"], "Special", None),
    (9, ["Adventure"], None, 2015),
    (10, ["Drama", "Comedy"], "tv", 1990),
]
FILTER_CASES = [
    (SearchFilter(), {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}),
    (SearchFilter(include_genres=["action"]), {1, 3, 7}),
    (SearchFilter(include_genres=["DRAMA", "Sci-Fi"]), {4, 6, 7, 10}),
    (SearchFilter(exclude_genres=["Comedy"]), {1, 4, 5, 6, 7, 9}),
    (SearchFilter(exclude_genres=["comedy", "Drama"]), {1, 5, 7, 9}),
    (SearchFilter(types=["TV"]), {1, 2, 5, 10}),
    (SearchFilter(types=["movie", "Ova"]), {3, 4, 6}),
    (SearchFilter(year_min=2005), {2, 3, 5, 7, 9}),
    (SearchFilter(year_max=2001), {1, 6, 10}),
    (SearchFilter(year_min=2001, year_max=2010), {2, 3, 5, 6}),
    (SearchFilter(exclude_ids=[1, 2, 99]), {3, 4, 5, 6, 7, 8, 9, 10}),
    (
        SearchFilter(
            include_genres=["Comedy"], exclude_genres=["Romance"], types=["TV", "Movie"], year_min=2000, exclude_ids=[3]
        ),
        {2},
    ),
]


def test_every_filter_gives_the_exact_filtered_top_k(index):
    rng = np.random.default_rng(3)
    ids = np.array([c[0] for c in CATALOGUE])
    vectors = unit_rows(rng, len(ids))
    payloads = [{"genres": g, "type": t, "year": y, "members": 100 * i} for i, g, t, y in CATALOGUE]
    index.create_version("v1", DIM, points_of(ids, vectors, payloads))
    index.set_alias("v1")
    q = unit_rows(rng, 1)[0]
    for flt, allowed in FILTER_CASES:
        for k in (3, 10):
            want, _ = numpy_top(ids, vectors, q, k, keep=allowed)
            got = index.search(q, limit=k, flt=flt)
            assert [h.anime_id for h in got] == want, (flt, k)
    hit = index.search(q, limit=1, flt=SearchFilter(include_genres=["SCI-FI"]))[0]
    assert hit.payload == {"genres": ["sci-fi", "Action"], "type": "ONA", "year": 2020, "members": 700, "anime_id": 7}


def test_payload_matches_is_the_engines_filter_in_python():
    """The ranker scores its added anime outside the engine (services/ranker/memory_scan.py) with
    payload_matches: the same cases give the same anime as the engine's search above."""
    for flt, allowed in FILTER_CASES:
        got = {
            i
            for i, g, t, y in CATALOGUE
            if payload_matches({"anime_id": i, "genres": g, "type": t, "year": y, "cold": i % 2 == 0}, flt)
        }
        assert got == allowed, flt
    cold = SearchFilter(cold_only=True, include_genres=["comedy"])
    assert {
        i for i, g, t, y in CATALOGUE if payload_matches({"anime_id": i, "genres": g, "cold": i % 2 == 0}, cold)
    } == {
        2,
        8,
        10,
    }
    assert not payload_matches({"anime_id": 5, "genres": [], "cold": None}, SearchFilter(cold_only=True))


def test_cold_only_translates_to_a_must_condition_on_the_boolean_cold_field():
    from qdrant_client import models

    from anime2vec.index.client import client_filter
    from anime2vec.index.edge import edge_filter

    edge = edge_filter(SearchFilter(cold_only=True))
    (cond,) = edge.must
    assert edge.must_not is None and cond.key == "cold"
    # a boolean, not the integer 1 that qdrant-edge makes of a Python True (never matches a bool)
    assert cond.match.value is True
    assert client_filter(SearchFilter(cold_only=True)) == models.Filter(
        must=[models.FieldCondition(key="cold", match=models.MatchValue(value=True))]
    )
    both = client_filter(SearchFilter(cold_only=True, include_genres=["Action"], exclude_ids=[3]))
    assert [c.key for c in both.must] == ["_genres", "cold"] and len(both.must_not) == 1
    assert edge_filter(SearchFilter(cold_only=False)) is None and client_filter(SearchFilter()) is None


@pytest.mark.parametrize("exact", [True, False])
def test_cold_only_keeps_exactly_the_cold_points_upserted_ones_included(index, exact):
    """Points whose payload says cold (true) pass; warm ones (false) and ones without the field do
    not; a cold point upserted after the build passes too, and the condition combines with others."""
    ids, vectors, queries = clustered_items(n=600)
    payloads = [
        {"genres": ["Mecha" if i % 2 else "Drama"], **({"cold": bool(i % 4 == 0)} if i % 7 else {})} for i in ids
    ]
    index.create_version("v1", vectors.shape[1], points_of(ids, vectors, payloads))
    index.set_alias("v1")
    cold = {int(i) for i, p in zip(ids, payloads) if p.get("cold") is True}
    q = queries[2]
    index.upsert(
        [
            ItemPoint(90_001, q * 3.0, {"cold": True, "genres": ["Drama"]}),
            ItemPoint(90_002, q * 2.9, {"cold": False, "genres": ["Drama"]}),
        ]
    )
    got = [h.anime_id for h in index.search(q, limit=20, flt=SearchFilter(cold_only=True), exact=exact)]
    want, _ = numpy_top(ids, vectors, q, 19, keep=cold)
    assert got == [90_001] + want
    drama = {int(i) for i in ids if i % 2 == 0} & cold
    flt = SearchFilter(cold_only=True, include_genres=["drama"], exclude_ids=[90_001, want[0]])
    pages = [index.search(q, limit=5, offset=off, flt=flt, exact=exact) for off in (0, 5)]
    want, _ = numpy_top(ids, vectors, q, 10, keep=drama - {want[0]})
    assert [h.anime_id for page in pages for h in page] == want


def test_cold_only_works_on_an_edge_version_built_without_the_cold_index(tmp_path, monkeypatch):
    """Versions built before "cold" was indexed still filter on it (the engine reads the payload)."""
    import anime2vec.index.edge as index_edge

    monkeypatch.setattr(index_edge, "_INDEXED_FIELDS", tuple(f for f in index_edge._INDEXED_FIELDS if f[0] != "cold"))
    ids, vectors, queries = clustered_items(n=300)
    index = EdgeItemIndex(tmp_path / "edge")
    try:
        index.create_version("v1", vectors.shape[1], points_of(ids, vectors, [{"cold": i % 3 == 0} for i in ids]))
        index.set_alias("v1")
        want, _ = numpy_top(ids, vectors, queries[0], 10, keep={int(i) for i in ids if i % 3 == 0})
        assert [h.anime_id for h in index.search(queries[0], limit=10, flt=SearchFilter(cold_only=True))] == want
    finally:
        index.close()


def test_upsert_is_searchable_at_once_and_survives_reopen(make_index, random_items):
    ids, vectors, queries = random_items
    ids, vectors = ids[:100], vectors[:100]
    index = make_index(persistent=True)
    index.create_version("v1", DIM, points_of(ids, vectors))
    index.set_alias("v1")
    q = queries[0]
    new = ItemPoint(70_001, q * 3.0, {"title": "brand new", "genres": ["Mecha"], "cold": True, "source": "upsert"})
    replaced = ItemPoint(int(ids[0]), -q, {"title": "rewritten"})
    index.upsert([new, replaced])
    top = index.search(q, limit=1)[0]
    assert (top.anime_id, round(top.score, 4)) == (70_001, 3.0)
    assert index.count() == len(ids) + 1
    assert index.search(q, limit=1, flt=SearchFilter(include_genres=["mecha"]))[0].anime_id == 70_001
    index.close()

    index = make_index(persistent=True)
    assert index.alias_target() == "v1"
    assert index.search(q, limit=1)[0].anime_id == 70_001
    got = index.get([70_001, 123_456_789, int(ids[0])], with_vectors=True)
    assert [p.anime_id for p in got] == [70_001, int(ids[0])]
    np.testing.assert_allclose(got[0].vector, q * 3.0, atol=1e-6)
    np.testing.assert_allclose(got[1].vector, -q, atol=1e-6)
    assert got[1].payload == {"title": "rewritten", "anime_id": int(ids[0])}
    assert index.get([70_001])[0].vector is None


def test_searches_follow_the_alias_through_promotion_and_rollback(index, random_items):
    ids, v1, queries = random_items
    v2 = unit_rows(np.random.default_rng(99), len(ids))
    assert index.alias_target() is None
    index.create_version("v1", DIM, points_of(ids, v1))
    index.create_version("20250101-000000-abcdef12", DIM, points_of(ids, v2))
    assert index.versions() == ["20250101-000000-abcdef12", "v1"]
    q = queries[1]
    top_v1, _ = numpy_top(ids, v1, q, 10)
    top_v2, _ = numpy_top(ids, v2, q, 10)
    assert top_v1 != top_v2
    for version, want in (("v1", top_v1), ("20250101-000000-abcdef12", top_v2), ("v1", top_v1)):
        index.set_alias(version)
        assert index.alias_target() == version
        assert [h.anime_id for h in index.search(q, limit=10)] == want
    assert [h.anime_id for h in index.search(q, limit=10, version="20250101-000000-abcdef12")] == top_v2

    index.upsert([ItemPoint(70_002, q, {})])  # goes to the alias target only
    assert (index.count("v1"), index.count("20250101-000000-abcdef12")) == (len(ids) + 1, len(ids))


def test_versions_are_never_half_built_or_silently_replaced(index, random_items):
    ids, vectors, queries = random_items

    def failing_after_50():
        yield from points_of(ids[:50], vectors[:50])
        raise RuntimeError("bundle read failed")

    with pytest.raises(RuntimeError, match="bundle read failed"):
        index.create_version("v1", DIM, failing_after_50(), batch=16)
    bad = points_of(ids[:20], vectors[:20]) + [ItemPoint(5, np.ones(DIM + 1, np.float32), {})]
    with pytest.raises(ValueError, match="shape"):
        index.create_version("v1", DIM, bad, batch=8)
    assert not index.has_version("v1") and index.versions() == []
    with pytest.raises(UnknownVersion):
        index.set_alias("v1")

    index.create_version("v1", DIM, points_of(ids, vectors))
    index.set_alias("v1")
    with pytest.raises(VersionExists):
        index.create_version("v1", DIM, points_of(ids[:5], vectors[:5]))
    with pytest.raises(VersionInUse):
        index.create_version("v1", DIM, points_of(ids[:5], vectors[:5]), overwrite=True)
    with pytest.raises(VersionInUse):
        index.delete_version("v1")
    with pytest.raises(ValueError, match="shape"):
        index.upsert([ItemPoint(70_003, np.full(DIM, np.nan, np.float32), {})])
    assert index.count() == len(ids)

    index.create_version("v2", DIM, points_of(ids, vectors))
    assert index.create_version("v2", DIM, points_of(ids[:5], vectors[:5]), overwrite=True) == 5
    assert index.count("v2") == 5
    index.delete_version("v2")
    assert index.versions() == ["v1"]


def test_unknown_versions_raise_unknown_version(index, random_items):
    ids, vectors, queries = random_items
    with pytest.raises(UnknownVersion, match="alias"):
        index.search(queries[0], limit=3)
    index.create_version("v1", DIM, points_of(ids[:10], vectors[:10]))
    for call in (
        lambda: index.search(queries[0], limit=3, version="v9"),
        lambda: index.count("v9"),
        lambda: index.get([1], version="v9"),
        lambda: index.upsert(points_of(ids[:1], vectors[:1]), "v9"),
        lambda: index.set_alias("v9"),
        lambda: index.delete_version("v9"),
    ):
        with pytest.raises(UnknownVersion) as err:
            call()
        assert isinstance(err.value, KeyError) and "v9" in str(err.value)
    with pytest.raises(ValueError, match="invalid index version"):
        index.create_version("../escape", DIM, [])


def test_query_hook_times_each_data_call(make_index, random_items):
    ids, vectors, queries = random_items
    seen: list[tuple[str, float]] = []
    index = make_index(on_query=lambda op, s: seen.append((op, s)))
    index.create_version("v1", DIM, points_of(ids[:20], vectors[:20]))
    index.set_alias("v1")
    index.search(queries[0], limit=3)
    index.search_batch(queries, limit=3)
    index.get([int(ids[0])])
    index.upsert(points_of(ids[:2], vectors[:2]))
    index.count()
    assert [op for op, _ in seen] == ["search", "search_batch", "get", "upsert", "count"]
    assert all(s >= 0 for _, s in seen)


def test_edge_follows_an_alias_switched_by_another_process(tmp_path, random_items):
    """An offline `index` command (here a second EdgeItemIndex on the same root) builds and promotes
    a version while the ranker's index is open; the ranker's next search uses it."""
    ids, vectors, queries = random_items
    ranker = EdgeItemIndex(tmp_path)
    ranker.create_version("v1", DIM, points_of(ids, vectors))
    ranker.set_alias("v1")
    assert ranker.search(queries[0], limit=1)[0].anime_id == numpy_top(ids, vectors, queries[0], 1)[0][0]

    job = EdgeItemIndex(tmp_path)
    flipped = -vectors
    job.create_version("v2", DIM, points_of(ids, flipped))
    job.set_alias("v2")
    with pytest.raises(IndexUnavailable, match="v1"):  # the ranker holds v1's shard
        job.count("v1")
    job.close()

    assert ranker.search(queries[0], limit=5)[0].anime_id == numpy_top(ids, flipped, queries[0], 1)[0][0]

    job = EdgeItemIndex(tmp_path)  # roll back, then try to drop v2 while the ranker still has it open
    job.set_alias("v1")
    with pytest.raises(VersionInUse, match="another process"):
        job.delete_version("v2")
    assert job.versions() == ["v1", "v2"]
    job.close()
    assert ranker.search(queries[0], limit=1)[0].anime_id == numpy_top(ids, vectors, queries[0], 1)[0][0]
    ranker.close()


def test_edge_serves_searches_from_many_threads_during_upserts(tmp_path, random_items):
    ids, vectors, queries = random_items
    index = EdgeItemIndex(tmp_path)
    index.create_version("v1", DIM, points_of(ids, vectors))
    index.set_alias("v1")
    want = [numpy_top(ids, vectors, q, 5)[0] for q in queries]
    errors: list[BaseException] = []

    def searcher(q, expected):
        try:
            for _ in range(40):
                assert [h.anime_id for h in index.search(q, limit=5)] == expected
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    def upserter():
        try:
            for k in range(40):  # zero vectors score 0, below every query's top 5
                index.upsert([ItemPoint(80_000 + k, np.zeros(DIM, np.float32), {})])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(q, w)) for q, w in zip(queries, want)]
    threads.append(threading.Thread(target=upserter))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert index.count() == len(ids) + 40
    index.close()


@pytest.mark.timeout(30)
def test_unreachable_server_raises_index_unavailable():
    with pytest.raises(IndexUnavailable, match="unreachable"):
        open_index(None, "http://127.0.0.1:1", timeout_s=2)


def test_edge_concurrent_searches_share_engine_calls_and_answer_like_single_searches(tmp_path, random_items):
    """Searches from many threads, announced as the ranker announces them, run as batches
    (anime2vec/index/coalesce.py) and still get exactly their own pages: offsets, excluded ids
    and both search modes mixed in one batch."""
    ids, vectors, queries = random_items
    sizes: list[int] = []  # searches per engine call
    index = EdgeItemIndex(tmp_path, max_batch=8, on_batch=sizes.append)
    index.create_version("v1", DIM, points_of(ids, vectors))
    index.set_alias("v1")
    cases = [
        (q, limit, offset, SearchFilter(exclude_ids=tuple(int(a) for a in ids[:n])) if n else None, exact)
        for q in queries
        for limit, offset, n, exact in ((5, 0, 0, True), (11, 3, 0, False), (7, 0, 4, False), (3, 20, 70, True))
    ]
    alone = [
        [(h.anime_id, h.score) for h in index.search(q, limit=k, offset=o, flt=f, exact=e)] for q, k, o, f, e in cases
    ]
    sizes.clear()
    start = threading.Barrier(len(cases))
    got: dict[int, list] = {}

    def searcher(j, q, k, o, f, e):
        with index.search_expected():  # as the ranker's request path does, before building its vector
            start.wait(10)
            got[j] = [(h.anime_id, h.score) for h in index.search(q, limit=k, offset=o, flt=f, exact=e)]

    threads = [threading.Thread(target=searcher, args=(j, *case)) for j, case in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [got[j] for j in range(len(cases))] == alone
    assert sum(sizes) == len(cases) and len(sizes) < len(cases) and max(sizes) > 1
    index.close()

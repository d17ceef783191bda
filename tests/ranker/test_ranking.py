"""Ranker helpers on arrays: the in-memory filter matches the Qdrant filter semantics; MMR."""

import numpy as np
import pytest

from anime2vec.index.base import SearchFilter
from anime2vec.serving.errors import ServiceError
from anime2vec.v1 import common_pb2
from services.ranker.ranking import Candidate, CatalogueFilter, mmr, search_filter, validate_options


@pytest.fixture
def filt():
    return CatalogueFilter(
        np.array([10, 20, 30, 40]),
        genres=[["Action", "Drama"], ["Comedy"], [], ["action"]],
        types=["TV", "Movie", "TV", "OVA"],
        years=[2001, None, 1995, 2010],
    )


def test_filter_semantics(filt):
    ids = lambda f: filt.item_ids[filt.mask(f)].tolist()  # noqa: E731
    assert ids(SearchFilter(include_genres=("ACTION",))) == [10, 40]  # case-insensitive, any-of
    assert ids(SearchFilter(exclude_genres=("comedy",))) == [10, 30, 40]
    assert ids(SearchFilter(types=("tv",))) == [10, 30]
    assert ids(SearchFilter(year_min=2000)) == [10, 40]  # unknown year dropped
    assert ids(SearchFilter(year_max=2005, exclude_ids=(10,))) == [30]
    assert ids(SearchFilter(include_genres=("Nope",))) == []


def test_cold_only_keeps_the_items_marked_cold_and_comes_from_cold_start_only():
    filt = CatalogueFilter(
        np.array([10, 20, 30, 40]),
        genres=[["Action"], ["Comedy"], ["Action"], []],
        types=["TV"] * 4,
        years=[None] * 4,
        cold=np.array([False, True, True, False]),
    )
    ids = lambda f: filt.item_ids[filt.mask(f)].tolist()  # noqa: E731
    assert ids(SearchFilter(cold_only=True)) == [20, 30]
    assert ids(SearchFilter(cold_only=True, include_genres=("action",), exclude_ids=(20,))) == [30]
    assert ids(SearchFilter()) == [10, 20, 30, 40]
    no_cold = CatalogueFilter(np.array([1, 2]), genres=[[], []], types=["TV", "TV"], years=[None, None])
    assert not no_cold.mask(SearchFilter(cold_only=True)).any()  # cold not given: nothing is cold
    flt = search_filter(common_pb2.Filters(cold_start_only=True, include_genres=[" Action "]), {7})
    assert flt == SearchFilter(include_genres=("Action",), exclude_ids=(7,), cold_only=True)
    assert search_filter(common_pb2.Filters(), set()).cold_only is False


def test_cold_start_only_is_unanswerable_only_without_any_cold_anime():
    from types import SimpleNamespace

    from google.rpc import error_details_pb2

    from anime2vec.serving_model.model import ItemMeta
    from services.ranker.retrieval import cold_unanswerable
    from services.ranker.state import has_cold

    def serving(cold, extra=()):
        return SimpleNamespace(
            filt=SimpleNamespace(cold=np.asarray(cold, bool)),
            version="v1",
            extra={a: ItemMeta(a, np.zeros(2, np.float32), {"cold": c}) for a, c in extra},
        )

    assert has_cold(serving([False, True]))
    assert not has_cold(serving([False, False], extra=[(5, False)]))  # a replaced warm anime stays warm
    assert has_cold(serving([False, False], extra=[(5, False), (100_000_001, True)]))  # an added one
    err = cold_unanswerable(serving([False]))
    assert err.code.name == "INVALID_ARGUMENT"
    bad = next(d for d in err.details if isinstance(d, error_details_pb2.BadRequest))
    info = next(d for d in err.details if isinstance(d, error_details_pb2.ErrorInfo))
    assert [v.field for v in bad.field_violations] == ["options.filters.cold_start_only"]
    assert info.reason == "FILTER_UNANSWERABLE"


def test_mmr_without_diversity_is_the_relevance_order_and_with_it_spreads_out():
    x = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.98, 0.2]], np.float32)
    cands = [Candidate(i, s, {}, x[i]) for i, s in enumerate([1.0, 0.95, 0.9, 0.85])]
    assert [c.anime_id for c in mmr(cands, 0.0)] == [0, 1, 2, 3]
    # with diversity the orthogonal item 2 moves ahead of the near-duplicate 1
    assert [c.anime_id for c in mmr(cands, 0.7)][:2] == [0, 2]
    # a disliked direction pushes similar items down
    assert [c.anime_id for c in mmr(cands, 0.0, dislikes=x[[1]])] == [0, 2, 1, 3]


def test_options_are_validated_with_the_field_named():
    with pytest.raises(ServiceError) as e:
        validate_options(
            common_pb2.RecommendOptions(
                limit=1000, diversity=1.5, filters=common_pb2.Filters(year_min=2010, year_max=2000)
            ),
            default_limit=10,
            max_limit=100,
            max_ids=10,
        )
    msg = e.value.message
    assert "options.limit" in msg and "options.diversity" in msg and "options.filters.year_min" in msg
    assert validate_options(common_pb2.RecommendOptions(), 10, 100, 10) == (10, 0.0)


def test_the_memory_scan_ranks_exactly_with_exclusions_and_added_anime():
    """Exact searches are answered in memory (services/ranker/memory_scan.py): the exact top-k of
    the rows a filter keeps (every row without one), minus excluded ids and bundle rows an added
    anime replaces, merged with the added anime that pass; a selective filter's rows are copied
    together and cached, a broad one's are gathered from the full product."""
    from anime2vec.serving_model.model import ItemMeta
    from services.ranker.memory_scan import MemoryScan

    rng = np.random.default_rng(0)
    n = 400
    ids = np.arange(1000, 1000 + n)
    genres = [["Mecha"] if i % 10 == 0 else ["Comedy"] for i in range(n)]  # 40 mecha: a tenth
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    filt = CatalogueFilter(ids, genres, types=["TV"] * n, years=[2000] * n)
    # room for two blocks of 40 rows (16 float32 each, and their row numbers)
    block_bytes = 40 * (16 * 4 + 8)
    scan = MemoryScan(ids, vectors, filt, max_fraction=0.25, cached_bytes=2 * block_bytes + 360 * 8 - 1)
    q = rng.normal(size=16).astype(np.float32)
    mecha = SearchFilter(include_genres=("mecha",))

    def exact_top(rows, k, gone=()):
        rows = np.setdiff1d(rows, [r for r in range(n) if int(ids[r]) in gone])
        return [int(ids[r]) for r in rows[np.argsort(-(vectors[rows] @ q))][:k]]

    # no filter: every row, nothing copied or cached
    assert scan.block(SearchFilter()) is scan.everything and not scan._blocks
    got = scan.search(q, SearchFilter(exclude_ids=(int(ids[3]),)), 10, {})
    assert [h.anime_id for h in got] == exact_top(np.arange(n), 10, gone={int(ids[3])})
    # a broad filter (90%): its rows, gathered from the full product
    comedy = SearchFilter(include_genres=("Comedy",))
    broad = scan.block(comedy)
    assert broad.vectors is None and not broad.full and len(broad.rows) == 360
    comedy_rows = np.flatnonzero([g == ["Comedy"] for g in genres])
    assert [h.anime_id for h in scan.search(q, comedy, 10, {})] == exact_top(comedy_rows, 10)

    rows = np.flatnonzero([g == ["Mecha"] for g in genres])
    exact = rows[np.argsort(-(vectors[rows] @ q))]
    got = scan.search(q, mecha, 10, {})
    assert [h.anime_id for h in got] == [int(ids[r]) for r in exact[:10]]
    assert [h.score for h in got] == pytest.approx([float(vectors[r] @ q) for r in exact[:10]], rel=1e-5)

    best, second = int(ids[exact[0]]), int(ids[exact[1]])
    replaced = ItemMeta(second, np.zeros(4), {"anime_id": second, "genres": ["Comedy"], "cold": True}, vector=q)
    new = ItemMeta(7, np.zeros(4), {"anime_id": 7, "genres": ["MECHA"], "type": "TV", "cold": True}, vector=q * 100)
    got = scan.search(q, SearchFilter(include_genres=("mecha",), exclude_ids=(best,)), 5, {second: replaced, 7: new})
    # 7 passes and scores highest; `best` is excluded; `second` became a comedy: its bundle row is gone
    assert [h.anime_id for h in got] == [7, *(int(ids[r]) for r in exact[2:6])]
    assert got[0].added is new and got[0].row is None and got[1].row == exact[2]
    assert len(scan.search(q, mecha, 1000, {})) == len(rows)  # a deep page ends with the matching rows

    scan.search(q, SearchFilter(types=("TV",), include_genres=("mecha",)), 3, {})
    scan.search(q, SearchFilter(year_min=1990, include_genres=("mecha",)), 3, {})
    # over the byte budget, the least recently used go first (the broad filter's rows, then mecha alone)
    assert len(scan._blocks) == 2 and scan._bytes == 2 * block_bytes
    assert scan.key(mecha) not in scan._blocks and scan.key(comedy) not in scan._blocks

    # a filter no bundle anime passes: only the added anime that pass it, exclusions or not
    nothing = SearchFilter(include_genres=("mecha",), types=("Movie",), exclude_ids=(best, 7))
    assert scan.search(q, nothing, 10, {}) == []
    movie = ItemMeta(8, np.zeros(4), {"anime_id": 8, "genres": ["Mecha"], "type": "movie"}, vector=q)
    assert [h.anime_id for h in scan.search(q, nothing, 10, {7: new, 8: movie})] == [8]


def _hard_vectors(n: int = 3000, dim: int = 64, seed: int = 1) -> np.ndarray:
    """Clustered rows (many near-ties) with norms spread over two orders of magnitude, columns of
    very different scales, large coordinates that cancel, one-hot columns (the served vectors'
    groups) and exact duplicates (exact ties): where a quantized product errs most."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim)) * 3
    x = centres[rng.integers(0, 30, n)] + 0.05 * rng.normal(size=(n, dim))
    x[:, :4] += rng.normal(size=(n, 1)) * np.array([50.0, -50.0, 50.0, -50.0])  # cancels in many queries
    x[:, -3:] = np.eye(3)[rng.integers(0, 3, n)]
    x = x * rng.lognormal(0.0, 1.0, (n, 1))
    x[n // 2 : n // 2 + 200] = x[:200]  # 200 anime with the same vector as another
    return x.astype(np.float32)


def _scans(vectors: np.ndarray):
    from services.ranker.memory_scan import MemoryScan

    n = len(vectors)
    ids = np.arange(10, 10 + n)
    genres = [["Mecha"] if i % 10 == 0 else ["Comedy"] for i in range(n)]
    filt = CatalogueFilter(ids, genres, types=["TV"] * n, years=[2000] * n)
    return MemoryScan(ids, vectors, filt, precision="float32"), MemoryScan(ids, vectors, filt, precision="int8")


@pytest.mark.parametrize("kernel", ["vnni", "torch"])
def test_the_int8_scan_bound_holds_and_ranks_as_float32_does(kernel, monkeypatch):
    """A2V_RANKER_SEARCH_PRECISION=int8, with each int8 product (the compiled VNNI kernel, torch's
    `_int_mm`): the float32 score is within the int8 copy's bound of its approximate one, and both
    paths rescore their candidates with the same float64 row products and order them by (score,
    anime id): the same page, ties included, unfiltered, broad filter, exclusions, every page depth,
    and a page is the start of every longer one."""
    from anime2vec.native import scan as native_scan
    from services.ranker import memory_scan

    vectors = _hard_vectors()
    n, dim = vectors.shape
    if kernel == "vnni" and not native_scan.available(dim):
        pytest.skip("the compiled int8 kernel is not built here or this CPU has no AVX-512 VNNI")
    if kernel == "torch" and not memory_scan.int8_products_exact(n, dim):
        pytest.skip("this CPU's int8 product does not sum exactly (no VNNI): the ranker scans float32 here")
    monkeypatch.setattr(memory_scan, "int8_kernel", lambda n, d: kernel)
    f32, i8 = _scans(vectors)
    assert i8.precision == "int8" and f32.precision == "float32" and i8._int8 is not None
    assert i8.int8_kernel == kernel and f32.int8_kernel is None
    rng = np.random.default_rng(2)
    queries = [vectors[i] for i in rng.integers(0, n, 10)]
    queries += [vectors[rng.integers(0, n, 3)].mean(axis=0) for _ in range(10)]
    queries += [rng.normal(size=dim).astype(np.float32) for _ in range(5)]
    queries += [np.zeros(dim, np.float32), vectors[0] * 1e-20, vectors[1] * 1e15]
    used = 0.0
    for q in queries:
        approx, slack = i8._int8.scores(q)
        err = np.abs(approx - (vectors.astype(np.float64) @ q.astype(np.float64)))
        assert np.all(err <= slack)
        used = max(used, float(np.max(err / np.maximum(slack, 1e-300))))
        for flt in (SearchFilter(), SearchFilter(include_genres=("Comedy",)), SearchFilter(exclude_ids=(10, 11, 12))):
            longest = None
            for limit in (n, 100, 11, 1):
                want, got = f32.search(q, flt, limit, {}), i8.search(q, flt, limit, {})
                assert [(h.anime_id, h.score) for h in got] == [(h.anime_id, h.score) for h in want]
                if longest is None:
                    longest = [h.anime_id for h in got]
                assert [h.anime_id for h in got] == longest[:limit]
            exact = (vectors.astype(np.float64) @ q.astype(np.float64))[[h.anime_id - 10 for h in want]]
            assert [h.score for h in want] == pytest.approx(exact.tolist(), rel=1e-9, abs=1e-12)
    assert used > 0.05  # a bound that is not vacuous
    # a query that is not finite ranks no bundle anime, on either path
    bad = queries[0].copy()
    bad[0] = np.nan
    assert i8.search(bad, SearchFilter(), 5, {}) == [] == f32.search(bad, SearchFilter(), 5, {})
    # most of the catalogue is never rescored: the point of it
    cand = i8._int8.candidates(queries[0], 11, None)
    assert 11 <= len(cand) < n // 8
    none = np.zeros(0, np.int64)
    assert i8._int8_top(i8.block(SearchFilter()), queries[0], none, 11) is not None
    # an all-zero query makes every row a candidate: the float32 product over every row is cheaper
    zero = queries[-3]
    assert i8._int8_top(i8.block(SearchFilter()), zero, none, 11) is None


def test_the_int8_scan_is_not_used_where_it_cannot_be_exact(monkeypatch, caplog):
    """The scan falls back to float32, and says so, where its premises fail: a CPU whose int8 product
    does not sum exactly (probed at the served shape), a compiled kernel that fails or sums wrong, a
    compiled scan whose pages differ from the float32 search's, served vectors that are not all
    finite, an error outside the bound on the served vectors; an unknown precision is refused."""
    from services.ranker import memory_scan

    vectors = _hard_vectors(n=500)
    ids = np.arange(len(vectors))
    filt = CatalogueFilter(ids, [["Comedy"]] * len(ids), types=["TV"] * len(ids), years=[2000] * len(ids))
    assert not memory_scan.int8_products_exact(10, 1)  # one column: torch's product is not trusted
    with monkeypatch.context() as m, caplog.at_level("WARNING"):
        m.setattr(memory_scan, "int8_kernel", lambda n, d: None)
        scan = memory_scan.MemoryScan(ids, vectors, filt, precision="int8")
    assert scan.precision == "float32" and scan._int8 is None and "does not sum exactly" in caplog.text
    if memory_scan.native_scan.available(vectors.shape[1]):  # a compiled kernel that sums wrong is not used
        with monkeypatch.context() as m, caplog.at_level("WARNING"):
            m.setattr(memory_scan.native_scan.Int8Codes, "dot2", lambda self, q: np.zeros((2, self.n), np.int32))
            kernel = memory_scan.int8_kernel(*vectors.shape)
        assert kernel != "vnni" and "compiled int8 kernel disagreed" in caplog.text

        def broken(self, q):
            raise RuntimeError("a2v_int8_dot2 refused width 516")

        with monkeypatch.context() as m, caplog.at_level("WARNING"):  # nor one that fails: the ranker still starts
            m.setattr(memory_scan.native_scan.Int8Codes, "dot2", broken)
            scan = memory_scan.MemoryScan(ids, vectors, filt, precision="int8")
        assert scan.int8_kernel != "vnni" and "compiled int8 kernel failed" in caplog.text

        # nor a compiled scan that returns other pages than the float32 search (here: the worst rows)
        def wrong(self, query, k, eligible, limit, most):
            v, ids = self.source.vectors, self.source.ids
            at, scores = memory_scan.native_scan.top_rows(v, np.arange(len(v)), ids, -query, limit)
            return list(zip(ids[at].tolist(), (-scores).tolist(), at.tolist()))

        with monkeypatch.context() as m, caplog.at_level("WARNING"):
            m.setattr(memory_scan.native_scan.Int8Search, "records", wrong)
            m.setattr(memory_scan, "int8_kernel", lambda n, d: "vnni")
            scan = memory_scan.MemoryScan(ids, vectors, filt, precision="int8")
        assert scan.precision == "float32" and "unlike the float32 search's" in caplog.text
    broken = vectors.copy()
    broken[7, 3] = np.nan
    scan = memory_scan.MemoryScan(ids, broken, filt, precision="int8")
    assert scan.precision == "float32" and "not all finite" in caplog.text
    # the damaged row is never ranked; the others are, as without it
    got = [h.anime_id for h in scan.search(broken[8], SearchFilter(), 20, {})]
    assert 7 not in got and len(got) == 20
    if memory_scan.int8_kernel(*vectors.shape) is None:
        return  # the bound check below needs an exact int8 product
    real = memory_scan.Int8Copy.scores
    monkeypatch.setattr(memory_scan.Int8Copy, "scores", lambda self, q: (real(self, q)[0], 0.0 * real(self, q)[1]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        scan = memory_scan.MemoryScan(ids, vectors, filt, precision="int8")
    assert scan.precision == "float32" and scan._int8 is None and scan._search is None
    assert "outside its bound" in caplog.text
    with pytest.raises(ValueError, match="precision"):
        memory_scan.MemoryScan(ids, vectors, filt, precision="int4")
    assert memory_scan.MemoryScan(ids, vectors, filt, precision="auto").precision == "float32"

"""Ranker search latency: the embedded Qdrant index (exact search, as served) against an exact numpy
dot-product top-k over the same vectors, with and without a payload filter, in one run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.ranker.index import ItemPoint, SearchFilter, open_index

N_ITEMS = 16_686   # the served catalogue (anime with a synopsis)
TOP_K = 100
TARGET_P99_MS = 5.0
GENRES = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Fantasy", "Slice of Life", "Mystery",
          "Sports", "Horror", "Mecha", "Music")
TYPES = ("TV", "Movie", "OVA", "ONA", "Special")
FILTER = SearchFilter(include_genres=("Mecha", "Horror"), year_min=2000, year_max=2015)


def _catalogue(rng: np.random.Generator, n_items: int, dim: int
               ) -> tuple[np.ndarray, list[list[str]], np.ndarray, np.ndarray]:
    vectors = rng.standard_normal((n_items, dim), dtype=np.float32)
    genres = [list(rng.choice(GENRES, size=rng.integers(1, 4), replace=False)) for _ in range(n_items)]
    types = rng.choice(TYPES, size=n_items)
    years = rng.integers(1970, 2024, size=n_items)
    return vectors, genres, types, years


def _filter_mask(genres: list[list[str]], years: np.ndarray, flt: SearchFilter) -> np.ndarray:
    """The same condition as FILTER, as a boolean mask for the numpy baseline."""
    wanted = {g.casefold() for g in flt.include_genres}
    has_genre = np.array([any(g.casefold() in wanted for g in gs) for gs in genres])
    return has_genre & (years >= flt.year_min) & (years <= flt.year_max)


def _numpy_top_k(vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Indices of the exact top-k by dot product, best first (masked-out rows never qualify)."""
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        k = min(TOP_K, int(mask.sum()))
    else:
        k = TOP_K
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


def _latencies(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[np.ndarray, list]:
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - start)
    return np.asarray(times), results


def _summary(times: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3)}


def _recall(qdrant: list[list[int]], exact: list[np.ndarray]) -> float:
    """Mean overlap of Qdrant's ids with the exact top-k (1.0 means identical sets)."""
    return float(np.mean([len(set(q) & set(e.tolist())) / max(len(e), 1) for q, e in zip(qdrant, exact)]))


def run_search_bench(n_queries: int = 200, seed: int = 0, n_items: int = N_ITEMS, dim: int | None = None) -> dict:
    """dim: the served item-vector size (the newest full bundle's, else the constant measured on it)."""
    from bench.scale import served_dim

    dim = dim or served_dim()
    rng = np.random.default_rng(seed)
    vectors, genres, types, years = _catalogue(rng, n_items, dim)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    mask = _filter_mask(genres, years, FILTER)
    # Anime ids are the row numbers, so Qdrant hits and numpy indices compare directly.
    points = (ItemPoint(i, vectors[i], {"genres": genres[i], "type": str(types[i]), "year": int(years[i])})
              for i in range(n_items))
    with tempfile.TemporaryDirectory(prefix="a2v-bench-") as root:
        index = open_index(Path(root), None)
        try:
            start = time.perf_counter()
            index.create_version("bench", dim, points)
            index.set_alias("bench")
            build_s = time.perf_counter() - start
            index.search(queries[0], TOP_K)  # open the shard outside the timed loop
            q_all_t, q_all = _latencies(lambda q: [h.anime_id for h in index.search(q, TOP_K)], queries)
            q_flt_t, q_flt = _latencies(lambda q: [h.anime_id for h in index.search(q, TOP_K, flt=FILTER)], queries)
        finally:
            index.close()
    n_all_t, n_all = _latencies(lambda q: _numpy_top_k(vectors, q, None), queries)
    n_flt_t, n_flt = _latencies(lambda q: _numpy_top_k(vectors, q, mask), queries)
    cases = {"qdrant": _summary(q_all_t), "qdrant_filtered": _summary(q_flt_t),
             "numpy": _summary(n_all_t), "numpy_filtered": _summary(n_flt_t)}
    return {
        "items": n_items, "dim": dim, "top_k": TOP_K, "queries": n_queries,
        "filter": {"include_genres": list(FILTER.include_genres), "year_min": FILTER.year_min,
                   "year_max": FILTER.year_max, "matching_items": int(mask.sum())},
        "qdrant_build_s": build_s,
        "cases": cases,
        "recall_at_100": {"unfiltered": _recall(q_all, n_all), "filtered": _recall(q_flt, n_flt)},
        "ratio_p50": {"unfiltered": cases["qdrant"]["p50_ms"] / cases["numpy"]["p50_ms"],
                      "filtered": cases["qdrant_filtered"]["p50_ms"] / cases["numpy_filtered"]["p50_ms"]},
        "targets": {"recall": 1.0, "p99_ms": TARGET_P99_MS,
                    "recall_met": min(_recall(q_all, n_all), _recall(q_flt, n_flt)) >= 1.0,
                    "p99_met": max(cases["qdrant"]["p99_ms"], cases["qdrant_filtered"]["p99_ms"]) <= TARGET_P99_MS},
    }

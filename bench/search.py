"""Ranker search latency and recall: the embedded Qdrant index in both search modes (exact float32
scan, which the ranker serves by default; quantised int8 scan + float32 rescoring) against the tools a
user would pick instead, over the same vectors and queries, interleaved in one run, single-threaded like
one engine query:
  unfiltered: numpy (one BLAS thread) and faiss `IndexFlatIP`, and the hardware floor: one pass over
              the int8 copy of the vectors (what the quantised scan must at least read);
  filtered:   numpy over only the matching rows (gathered per query: what a user with the mask would
              write), faiss with an `IDSelectorBatch` of them, and numpy scanning everything then masking.
  The ranker answers exact searches in memory (services/ranker/memory_scan.py): that path is the
  served case, unfiltered and filtered (its block of matching vectors cached: a filter seen before;
  and built on the query: a filter seen first); Qdrant's searches, which serve with
  A2V_RANKER_SEARCH_IN_MEMORY=false or in the quantized mode, stay as lines.

Vectors and queries are the served ones when a full-data bundle is in the model store: the bundle's
item vectors and, as queries, favourites vectors (3 popular anime, as the gateway bench sends) and
training users' vectors, both built by the ranker's own ServingModel. Without a full bundle, clustered
synthetic vectors of the served size stand in (random Gaussian vectors are a worst case that no
served model produces: every score is within noise of every other). Recall is measured at the
served page (top-11: 10 results and one to know a next page exists) and at top-100.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anime2vec.index.backends import open_index
from anime2vec.index.base import DEFAULT_OVERSAMPLING, ItemPoint, SearchFilter
from anime2vec.native.scan import aligned_int8

N_ITEMS = 16_686  # the served catalogue (anime with a synopsis)
LIMITS = (11, 100)
SERVED_PAGE = 11  # what the ranker asks for a default page: 10 results and one to know more exist
TARGET_P99_MS = 5.0
TARGET_FLOOR_RATIO = 1.5  # served unfiltered p50 / the int8 read floor
TARGET_FILTERED_RATIO = 1.0  # served filtered p50 / numpy over the matching rows
GENRES = (
    "Action",
    "Comedy",
    "Drama",
    "Romance",
    "Sci-Fi",
    "Fantasy",
    "Slice of Life",
    "Mystery",
    "Sports",
    "Horror",
    "Mecha",
    "Music",
)
TYPES = ("TV", "Movie", "OVA", "ONA", "Special")
FILTER = SearchFilter(include_genres=("Mecha", "Horror"), year_min=2000, year_max=2015)
MODES = {"exact": True, "quantized": False}


def served_mode() -> str:
    """The search mode the ranker serves by default (A2V_RANKER_SEARCH_MODE)."""
    from services.ranker.settings import RankerSettings

    return RankerSettings.model_fields["search_mode"].default


def served_catalogue(n_queries: int, seed: int) -> dict | None:
    """The newest full bundle's item vectors, payload columns and served query vectors, or None."""
    from anime2vec.bundle import load_bundle, newest_bundle
    from anime2vec.paths import default_model_store
    from anime2vec.serving_model.model import ServingModel

    path = newest_bundle(default_model_store(), "full")
    if path is None:
        return None
    m = ServingModel(load_bundle(path), device="cpu")
    if not m.has_vectors:  # a bundle without the hybrid's arrays has no served vectors
        return None
    rng = np.random.default_rng(seed)
    popular = np.argsort(-m.popularity)[:500]
    half = n_queries // 2
    fav = [
        m.favourites_vector([int(m.item_ids[i]) for i in rng.choice(popular, 3, replace=False)], None)
        for _ in range(half)
    ]
    users = [m.user_vector(int(u)) for u in rng.choice(m.user_ids, n_queries - half, replace=False)]
    years = [m.payload(i)["year"] for i in range(len(m.item_ids))]
    return {
        "source": f"bundle {path.name}: served item vectors; queries = {half} favourites vectors "
        f"(3 of the 500 most popular) + {n_queries - half} training users' vectors",
        "vectors": np.ascontiguousarray(m.item_tower, np.float32),
        "queries": np.asarray(fav + users, np.float32),
        "genres": m.genres,
        "types": [str(t or "") for t in m.catalog["type"]],
        "years": np.array([-1 if y is None else y for y in years]),
    }


def synthetic_catalogue(n_queries: int, seed: int, n_items: int, dim: int) -> dict:
    """Clustered vectors with uneven norms, queries = means of 3 items (a favourites query)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim), dtype=np.float32)
    vectors = centres[rng.integers(0, 200, n_items)] + 0.7 * rng.standard_normal((n_items, dim), dtype=np.float32)
    vectors *= rng.lognormal(0.0, 0.3, (n_items, 1)).astype(np.float32)
    queries = np.stack([vectors[rng.choice(n_items, 3, replace=False)].mean(axis=0) for _ in range(n_queries)])
    return {
        "source": f"synthetic: {n_items:,} clustered vectors (no full-data bundle in the model store); "
        "queries = means of 3 items",
        "vectors": vectors,
        "queries": queries.astype(np.float32),
        "genres": [list(rng.choice(GENRES, size=rng.integers(1, 4), replace=False)) for _ in range(n_items)],
        "types": list(rng.choice(TYPES, size=n_items)),
        "years": rng.integers(1970, 2024, size=n_items),
    }


def _filter_mask(genres: list[list[str]], years: np.ndarray, flt: SearchFilter) -> np.ndarray:
    """The same condition as FILTER, as a boolean mask for the numpy baseline."""
    wanted = {g.casefold() for g in flt.include_genres}
    has_genre = np.array([any(g.casefold() in wanted for g in gs) for gs in genres])
    return has_genre & (years >= flt.year_min) & (years <= flt.year_max)


def _numpy_top_k(vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """Indices of the exact top-k by dot product, best first (masked-out rows never qualify)."""
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        k = min(k, int(mask.sum()))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


def _numpy_run(vectors: np.ndarray, mask: np.ndarray | None) -> Callable[[np.ndarray], list]:
    return lambda q: _numpy_top_k(vectors, q, mask, max(LIMITS)).tolist()


def int8_words(vectors: np.ndarray) -> np.ndarray:
    """The int8 copy of the vectors as 64-bit words: summing them is one pass over the int8 bytes, the
    read floor of any search over the catalogue. In memory allocated as the ranker's codes are
    (`aligned_int8`: huge pages where the kernel gives them): wherever numpy's allocation landed in
    4 KiB pages the same sum took 1.3-1.5x as long, and the floor moved from run to run with it."""
    lo, hi = np.quantile(vectors, [0.01, 0.99])
    int8 = np.clip(np.round((vectors - lo) / (hi - lo) * 255 - 128), -128, 127).astype(np.int8)
    size = int8.size // 8 * 8
    words = aligned_int8((1, size))
    words[0] = int8.reshape(-1)[:size]
    return words.reshape(-1).view(np.uint64)


def _peer_runs(vectors: np.ndarray, mask: np.ndarray) -> dict[str, Callable[[np.ndarray], list]]:
    """The peers at the served page (top-11), each returning row ids best first."""
    import faiss

    k = SERVED_PAGE
    rows = np.flatnonzero(mask)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    only = faiss.SearchParameters(sel=faiss.IDSelectorBatch(rows.astype(np.int64)))
    words = int8_words(vectors)
    words32 = np.ascontiguousarray(vectors).reshape(-1).view(np.uint32)[: vectors.size // 2 * 2].view(np.uint64)
    return {
        f"numpy top-{k}": lambda q: _numpy_top_k(vectors, q, None, k).tolist(),
        f"faiss flat top-{k}": lambda q: flat.search(q[None, :], k)[1][0].tolist(),
        "int8 read floor": lambda q: [int(words.sum())],
        # what the exact mode must at least read: the float32 vectors, 4x the bytes
        "float32 read floor": lambda q: [int(words32.sum())],
        f"numpy matching rows top-{k}": lambda q: rows[_numpy_top_k(vectors[rows], q, None, k)].tolist(),
        f"faiss id selector top-{k}": lambda q: flat.search(q[None, :], k, params=only)[1][0].tolist(),
        f"numpy scan all + mask top-{k}": lambda q: _numpy_top_k(vectors, q, mask, k).tolist(),
    }


def _in_memory_runs(cat: dict, vectors: np.ndarray) -> dict[str, Callable[[np.ndarray], list]]:
    """The ranker's in-memory exact search over the same vectors, unfiltered and under FILTER."""
    from services.ranker.memory_scan import MemoryScan
    from services.ranker.ranking import CatalogueFilter
    from services.ranker.settings import RankerSettings

    ids = np.arange(len(vectors))
    years = [None if y < 0 else int(y) for y in np.asarray(cat["years"])]
    filt = CatalogueFilter(ids, [list(g) for g in cat["genres"]], [str(t) for t in cat["types"]], years)
    # the precision the ranker's default setting picks here ("auto": timed on these vectors), and
    # float32 beside it
    precision = RankerSettings.model_fields["search_precision"].default
    scan = MemoryScan(ids, vectors, filt, precision=precision)
    cat["search_precision"] = scan.precision
    cat["int8_kernel"] = scan.int8_kernel
    f32 = MemoryScan(ids, vectors, filt, precision="float32")
    none = SearchFilter()
    runs: dict[str, Callable[[np.ndarray], list]] = {}
    for k in LIMITS:
        runs[f"ranker in-memory top-{k}"] = lambda q, k=k: [h.anime_id for h in scan.search(q, none, k, {})]
        runs[f"ranker in-memory filtered top-{k}"] = lambda q, k=k: [h.anime_id for h in scan.search(q, FILTER, k, {})]
        runs[f"ranker in-memory float32 top-{k}"] = lambda q, k=k: [h.anime_id for h in f32.search(q, none, k, {})]

    def first_seen(q: np.ndarray) -> list:
        scan.clear_blocks()
        return [h.anime_id for h in scan.search(q, FILTER, SERVED_PAGE, {})]

    runs[f"ranker in-memory filtered, filter seen first top-{SERVED_PAGE}"] = first_seen
    return runs


def _served(mode: str, k: int, filtered: bool) -> str:
    """The case that is what the ranker serves at top-k (the ranker's defaults)."""
    from services.ranker.settings import RankerSettings

    if mode == "exact" and RankerSettings.model_fields["search_in_memory"].default:
        return f"ranker in-memory{' filtered' if filtered else ''} top-{k}"
    return f"qdrant {mode}{' filtered' if filtered else ''} top-{k}"


def _qdrant_run(index, k: int, flt: SearchFilter | None, exact: bool) -> Callable[[np.ndarray], list]:
    return lambda q: [h.anime_id for h in index.search(q, k, flt=flt, exact=exact, oversampling=DEFAULT_OVERSAMPLING)]


def _interleaved(
    runs: dict[str, Callable[[np.ndarray], list]], queries: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Every case on each query in turn, in an order shuffled per query (seeded), so a stall of this
    shared machine falls on all cases alike, and so does whatever the case before left in the caches:
    each case follows every other about equally often. (A rotation keeps each case's predecessor
    fixed: the served search always came after numpy's scan-all-and-mask, the floor after faiss.)"""
    names = list(runs)
    times = {n: [] for n in names}
    found = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for q in queries:
        for at in rng.permutation(len(names)):
            n = names[at]
            start = time.perf_counter()
            got = runs[n](q)
            times[n].append(time.perf_counter() - start)
            found[n].append(got)
    return {n: np.asarray(t) for n, t in times.items()}, found


def _single_threaded(runs, queries):
    """_interleaved with BLAS, torch and faiss on one thread each: one engine query runs on one thread,
    and the ranker searches on one thread per request (services/ranker/server.py)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return _interleaved(runs, queries)
    finally:
        faiss.omp_set_num_threads(before)
        torch.set_num_threads(torch_before)


def _summary(times: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3)}


def _recall(got: list[list[int]], exact: list[np.ndarray]) -> float:
    """Mean overlap of the ids with the exact top-k (1.0 means identical sets)."""
    return float(np.mean([len(set(g) & set(e.tolist())) / max(len(e), 1) for g, e in zip(got, exact)]))


def run_search_bench(
    n_queries: int = 200, seed: int = 0, n_items: int = N_ITEMS, dim: int | None = None, use_bundle: bool = True
) -> dict:
    """dim: the synthetic vectors' size (default: the newest full bundle's, else the constant measured
    on it); ignored when the served vectors are used."""
    from bench.scale import served_dim

    cat = served_catalogue(n_queries, seed) if use_bundle else None
    if cat is None:
        cat = synthetic_catalogue(n_queries, seed, n_items, dim or served_dim())
    vectors, queries = cat["vectors"], cat["queries"]
    n_items, dim = vectors.shape
    years = np.asarray(cat["years"])
    mask = _filter_mask(cat["genres"], years, FILTER)
    # Anime ids are the row numbers, so Qdrant hits and numpy indices compare directly.
    points = (
        ItemPoint(
            i,
            vectors[i],
            {
                "genres": list(cat["genres"][i]),
                "type": cat["types"][i],
                "year": None if years[i] < 0 else int(years[i]),
            },
        )
        for i in range(n_items)
    )
    exact_ids = {
        (k, f): [_numpy_top_k(vectors, q, mask if f else None, k) for q in queries]
        for k in LIMITS
        for f in (False, True)
    }
    with tempfile.TemporaryDirectory(prefix="a2v-bench-") as root:
        index = open_index(Path(root), None)
        try:
            start = time.perf_counter()
            index.create_version("bench", dim, points)
            index.set_alias("bench")
            build_s = time.perf_counter() - start
            index.search(queries[0], 10)  # open the shard outside the timed loop
            runs: dict[str, Callable[[np.ndarray], list]] = {}
            for k in LIMITS:
                for mode, exact in MODES.items():
                    for filtered in (False, True):
                        runs[f"qdrant {mode}{' filtered' if filtered else ''} top-{k}"] = _qdrant_run(
                            index, k, FILTER if filtered else None, exact
                        )
            for filtered in (False, True):
                runs[f"numpy{' filtered' if filtered else ''}"] = _numpy_run(vectors, mask if filtered else None)
            runs.update(_peer_runs(vectors, mask))
            runs.update(_in_memory_runs(cat, vectors))
            times, found = _single_threaded(runs, queries)
        finally:
            index.close()
    cases = {n: _summary(t) for n, t in times.items()}
    filtered_peers = ("numpy matching rows", "faiss id selector", "numpy scan all")
    recall = {
        n: _recall(found[n], exact_ids[(int(n.rsplit("-", 1)[1]), "filtered" in n or n.startswith(filtered_peers))])
        for n in runs
        if "top-" in n and not n.startswith("numpy top") and n != "numpy"
    }
    mode = served_mode()
    page = f"top-{SERVED_PAGE}"
    served = [_served(mode, SERVED_PAGE, False), _served(mode, SERVED_PAGE, True)]
    served_top100 = [_served(mode, 100, False), _served(mode, 100, True)]
    floor = cases["int8 read floor"]["p50_ms"]
    matching = cases[f"numpy matching rows {page}"]["p50_ms"]
    served_unfiltered = cases[served[0]]["p50_ms"]
    served_filtered = cases[served[1]]["p50_ms"]
    peers = {
        "unfiltered": {
            "served_case": served[0],
            "served_p50_ms": served_unfiltered,
            "vs_numpy_1_thread": served_unfiltered / cases[f"numpy {page}"]["p50_ms"],
            "vs_faiss_flat": served_unfiltered / cases[f"faiss flat {page}"]["p50_ms"],
            "vs_int8_read_floor": served_unfiltered / floor,
            # per query, the served search over the floor pass of the same round (milliseconds apart, one
            # machine state): the median of those ratios, beside the ratio of the two p50s (the target's)
            "paired_vs_int8_read_floor": float(np.median(times[served[0]] / times["int8 read floor"])),
            "vs_float32_read_floor": served_unfiltered / cases["float32 read floor"]["p50_ms"],
            "vs_float32_in_memory": served_unfiltered / cases[f"ranker in-memory float32 {page}"]["p50_ms"],
        },
        "filtered": {
            "served_case": served[1],
            "served_p50_ms": served_filtered,
            "vs_numpy_matching_rows": served_filtered / matching,
            "paired_vs_numpy_matching_rows": float(np.median(times[served[1]] / times[f"numpy matching rows {page}"])),
            "vs_faiss_id_selector": served_filtered / cases[f"faiss id selector {page}"]["p50_ms"],
            "vs_numpy_scan_all_and_mask": served_filtered / cases[f"numpy scan all + mask {page}"]["p50_ms"],
        },
    }
    exact_cases = [n for n in cases if n.startswith("qdrant exact")]
    numpy_p50 = {False: cases["numpy"]["p50_ms"], True: cases["numpy filtered"]["p50_ms"]}
    return {
        "items": n_items,
        "dim": dim,
        "limits": list(LIMITS),
        "queries": len(queries),
        "source": cat["source"],
        "oversampling": DEFAULT_OVERSAMPLING,
        "served_mode": mode,
        "search_precision": cat.get("search_precision"),
        "int8_kernel": cat.get("int8_kernel"),
        "peers": peers,
        "served_page": SERVED_PAGE,
        "filter": {
            "include_genres": list(FILTER.include_genres),
            "year_min": FILTER.year_min,
            "year_max": FILTER.year_max,
            "matching_items": int(mask.sum()),
        },
        "qdrant_build_s": build_s,
        "cases": cases,
        "recall": recall,
        "ratio_p50_to_numpy": {
            n: c["p50_ms"] / numpy_p50["filtered" in n] for n, c in cases.items() if n.startswith(("qdrant", "ranker"))
        },
        "targets": {
            "recall": 1.0,
            "p99_ms": TARGET_P99_MS,
            "exact_recall": min(recall[n] for n in exact_cases),
            "served_recall": min(recall[n] for n in served),
            "served_p99_ms": max(cases[n]["p99_ms"] for n in served),
            "recall_met": min(recall[n] for n in exact_cases) >= 1.0,
            "p99_met": max(cases[n]["p99_ms"] for n in served) <= TARGET_P99_MS,
            "floor_ratio": TARGET_FLOOR_RATIO,
            "floor_met": peers["unfiltered"]["vs_int8_read_floor"] <= TARGET_FLOOR_RATIO,
            "filtered_ratio": TARGET_FILTERED_RATIO,
            "filtered_met": peers["filtered"]["vs_numpy_matching_rows"] <= TARGET_FILTERED_RATIO,
            "served_recall_top100": min(recall[n] for n in served_top100),
            "served_recall_met": min(recall[n] for n in served) >= 1.0
            and min(recall[n] for n in served_top100) >= 0.999,
        },
    }

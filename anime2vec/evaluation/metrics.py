"""Ranking metrics, computed per query and then averaged over queries (pure numpy/scipy).

Conventions shared by every function:
- `ranked`: (n_queries, L) int array of item indices, best first; -1 pads short lists and never
  counts as a hit or as a recommended item.
- `relevant`: the query's relevant items, either an (n_queries, n_items) sparse matrix whose
  non-zeros are relevant, or a sequence of n_queries index arrays. Every query must have at least
  one relevant item: a query with none has no defined recall and would silently bias a mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

Relevant: TypeAlias = sp.spmatrix | sp.sparray | Sequence[np.ndarray]


def _relevant_csr(relevant: Relevant, n_queries: int) -> sp.csr_matrix:
    """Binary csr copy (never a view of the caller's matrix), sorted, duplicates merged."""
    if sp.issparse(relevant):
        m = sp.csr_matrix(relevant, dtype=np.float32, copy=True)
    else:
        rows = [np.asarray(r, dtype=np.int64).ravel() for r in relevant]
        cols = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        n_cols = int(cols.max()) + 1 if len(cols) else 1
        r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
        m = sp.csr_matrix((np.ones(len(cols), np.float32), (r, cols)), shape=(len(rows), n_cols))
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    m.data[:] = 1.0
    if m.shape[0] != n_queries:
        raise ValueError(f"relevant has {m.shape[0]} rows but ranked has {n_queries} queries")
    empty = np.flatnonzero(m.getnnz(axis=1) == 0)
    if len(empty):
        raise ValueError(f"{len(empty)} queries have no relevant item (first rows: {empty[:5].tolist()})")
    return m


def _hits(ranked: np.ndarray, relevant: Relevant) -> tuple[np.ndarray, np.ndarray]:
    """(n_queries, L) bool: is ranked[q, r] relevant to q; and (n_queries,) relevant counts.

    Vectorised membership test: (row, item) pairs are encoded as row * n_items + item, which is
    sorted for a csr matrix with sorted indices, so one searchsorted answers every position."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-d (n_queries, L), got shape {ranked.shape}")
    rel = _relevant_csr(relevant, ranked.shape[0])
    n_cols = rel.shape[1]
    rows = np.repeat(np.arange(rel.shape[0], dtype=np.int64), np.diff(rel.indptr))
    keys = rows * n_cols + rel.indices
    valid = (ranked >= 0) & (ranked < n_cols)
    query_keys = np.arange(ranked.shape[0], dtype=np.int64)[:, None] * n_cols + np.where(valid, ranked, 0)
    pos = np.minimum(np.searchsorted(keys, query_keys), len(keys) - 1)
    hits = valid & (keys[pos] == query_keys)
    return hits, np.diff(rel.indptr)


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def recall_curve(ranked: np.ndarray, relevant: Relevant, max_k: int) -> np.ndarray:
    """(max_k,) mean recall@K for K = 1..max_k. Lists shorter than K count as they are."""
    max_k = _check_k(max_k)
    hits, n_rel = _hits(ranked, relevant)
    found = np.zeros((len(hits), max_k))
    width = min(max_k, hits.shape[1])
    found[:, :width] = np.cumsum(hits[:, :width], axis=1)
    if 0 < width < max_k:  # a list shorter than max_k: recall stays at its last value
        found[:, width:] = found[:, width - 1 : width]
    return (found / n_rel[:, None]).mean(axis=0)


def recall_per_query(ranked: np.ndarray, relevant: Relevant, k: int) -> np.ndarray:
    """(n_queries,) DropoutNet's recall: |top-k ∩ relevant| / |relevant| (not min(k, |relevant|))."""
    k = _check_k(k)
    hits, n_rel = _hits(ranked, relevant)
    return hits[:, :k].sum(axis=1) / n_rel


def recall_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    """Mean of `recall_per_query`."""
    return float(recall_per_query(ranked, relevant, k).mean())


def ndcg_per_query(ranked: np.ndarray, relevant: Relevant, k: int) -> np.ndarray:
    """(n_queries,) binary-gain NDCG@k: sum of 1/log2(rank+1) over hits, over the ideal for
    min(k, |relevant|)."""
    k = _check_k(k)
    hits, n_rel = _hits(ranked, relevant)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    top = hits[:, :k]
    dcg = top @ discount[: top.shape[1]]
    idcg = np.cumsum(discount)[np.minimum(n_rel, k) - 1]
    return dcg / idcg


def ndcg_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    """Mean of `ndcg_per_query`."""
    return float(ndcg_per_query(ranked, relevant, k).mean())


def bootstrap_ci(values: np.ndarray, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values (queries resampled with
    replacement): how far a reported mean could move with another draw of users."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(0, n_boot, 100):  # blocks of resamples keep memory at 100 x n_queries
        idx = rng.integers(0, len(v), (min(100, n_boot - b), len(v)))
        means[b : b + len(idx)] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mrr(ranked: np.ndarray, relevant: Relevant) -> float:
    """Mean reciprocal rank of the first relevant item; 0 for a query with none in its list.
    Pass the full ranking to get the untruncated value."""
    hits, _ = _hits(ranked, relevant)
    first = hits.argmax(axis=1)
    rr = np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)
    return float(rr.mean())


def mrr_from_scores(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean of `rr_from_scores`."""
    return float(rr_from_scores(scores, relevant).mean())


def rr_from_scores(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(n_queries,) reciprocal rank over the full ranking of `scores` without sorting it
    (O(n_candidates) per query).

    scores: (n_queries, n_candidates) with -inf for excluded candidates; relevant: bool mask of
    the same shape. The ranking is by score, ties broken by column order (a stable sort), so
    this equals `mrr` of the stably sorted full ranking. A query whose relevant items are all
    excluded scores 0; a query with none is an error, as for `mrr`."""
    s = np.asarray(scores)
    rel = np.asarray(relevant, dtype=bool)
    if s.shape != rel.shape:
        raise ValueError(f"scores {s.shape} and relevant {rel.shape} differ in shape")
    empty = np.flatnonzero(~rel.any(axis=1))
    if len(empty):
        raise ValueError(f"{len(empty)} queries have no relevant item (first rows: {empty[:5].tolist()})")
    best = np.where(rel, s, -np.inf).max(axis=1, keepdims=True)
    first = (rel & (s == best)).argmax(axis=1)  # the first relevant in column order among the best
    ahead = (s > best) | ((s == best) & (np.arange(s.shape[1]) < first[:, None]))
    rank = 1 + ahead.sum(axis=1)
    return np.where(np.isfinite(best[:, 0]), 1.0 / rank, 0.0)


def catalogue_coverage(all_recs: np.ndarray, n_candidates: int) -> float:
    """Share of the candidate items that appear in at least one recommendation list."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    recs = np.asarray(all_recs).ravel()
    return len(np.unique(recs[recs >= 0])) / n_candidates


def popularity_percentiles(popularity: np.ndarray) -> np.ndarray:
    """Each item's percentile (0-100) of training popularity among all items; ties share the
    mid-rank, so an item more popular than half the catalogue and tied with nobody scores 50."""
    pop = np.asarray(popularity, dtype=np.float64).ravel()
    return 100.0 * (rankdata(pop, method="average") - 0.5) / len(pop)


def popularity_percentile(recs: np.ndarray, popularity: np.ndarray) -> float:
    """Mean popularity percentile of the recommended items: per list, then over lists.
    popularity: (n_items,) training positives per item (all items, cold ones included)."""
    recs = np.asarray(recs)
    valid = recs >= 0
    pct = popularity_percentiles(popularity)[np.where(valid, recs, 0)]
    n = valid.sum(axis=1)
    keep = n > 0
    if not keep.any():
        return float("nan")
    return float(((pct * valid).sum(axis=1)[keep] / n[keep]).mean())


def intra_list_diversity(recs: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance (1 - cosine) within each list, averaged over lists.

    item_vectors is a fixed content space (n_items, d): every model must be measured in the SAME
    space, otherwise the numbers are not comparable (a model's own embeddings would flatter it).
    Centre sentence-embedding vectors first (anisotropy makes raw cosines all high). A zero
    vector has cosine 0 to everything. Lists with fewer than two items have no pairs and are
    left out; NaN when no list has two.

    Vectorised without the k x k matrix: for unit vectors, the sum of pairwise cosines in a list
    is (|sum x|^2 - sum |x|^2) / 2."""
    recs = np.asarray(recs)
    vecs = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)
    valid = recs >= 0
    x = unit[np.where(valid, recs, 0)] * valid[..., None]  # (n, k, d)
    n = valid.sum(axis=1)
    sum_sq = (x * x).sum(axis=(1, 2))
    total = x.sum(axis=1)
    pair_sim = ((total * total).sum(axis=1) - sum_sq) / 2.0
    pairs = n * (n - 1) / 2.0
    keep = pairs > 0
    if not keep.any():
        return float("nan")
    return float((1.0 - pair_sim[keep] / pairs[keep]).mean())

"""Maximal marginal relevance (Carbonell & Goldstein 1998): the diversity re-ranking the ranker
serves and the offline trade-off curve (evaluation/tradeoff.py) measures — one implementation,
so the curve describes what is served.

Greedily pick argmax (1-λ)·relevance − λ·max-similarity-to-the-picked, where relevance is the
model score min-max normalised within the list (so λ means the same for every model and query)
and similarity is the cosine of content vectors. λ = 0 is the score order; λ = 1 ignores the
scores after the first pick. The ranker's `RecommendOptions.diversity` is λ.

Batch-first: (n_queries, n_candidates) scores. Deterministic: ties break by candidate order.
"""

from __future__ import annotations

import numpy as np


def relevance(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise each row's finite scores to [0, 1] (all ones for a row without spread);
    non-finite scores (padding) stay -inf."""
    s = np.atleast_2d(np.asarray(scores, np.float64))
    ok = np.isfinite(s)
    lo = np.where(ok, s, np.inf).min(axis=1, keepdims=True)
    hi = np.where(ok, s, -np.inf).max(axis=1, keepdims=True)
    spread = hi - lo
    flat = ~(spread > 0)
    rel = np.where(flat, 1.0, (s - lo) / np.where(flat, 1.0, spread))
    return np.where(ok, rel, -np.inf)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """(…, n, n) cosine similarities of (…, n, d) vectors; a zero vector has cosine 0 to all."""
    x = np.asarray(vectors, np.float32)
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
    return unit @ np.swapaxes(unit, -1, -2)


def mmr_order(
    scores: np.ndarray,
    similarity: np.ndarray | None,
    diversity: float,
    k: int | None = None,
    penalty: np.ndarray | None = None,
) -> np.ndarray:
    """The MMR order of each row's candidates: (n_queries, k) positions into the row (or (k,)
    for 1-d input), best first, -1 where a row has fewer than k finite scores.

    scores: (n_queries, n) model scores, non-finite = not a candidate (padding).
    similarity: (n_queries, n, n) candidate-candidate similarity (`cosine_matrix`); unused at λ = 0.
    diversity: λ in [0, 1].
    penalty: (n_queries, n) subtracted from the normalised relevance before picking (the ranker's
    standing penalty for anime close to a disliked one)."""
    single = np.ndim(scores) == 1
    rel = relevance(scores)
    if penalty is not None:
        rel = rel - np.atleast_2d(np.asarray(penalty, np.float64))
    n_rows, n = rel.shape
    k = n if k is None else max(0, min(int(k), n))
    valid = np.isfinite(rel)
    if diversity <= 0:
        order = np.argsort(np.where(valid, -rel, np.inf), axis=1, kind="stable")[:, :k]
        order = np.where(np.take_along_axis(valid, order, axis=1), order, -1)
        return order[0] if single else order
    sim = np.asarray(similarity, np.float32)
    if single:
        sim = sim[None]
    if sim.shape != (n_rows, n, n):
        raise ValueError(f"similarity has shape {sim.shape}, expected {(n_rows, n, n)}")
    lam = float(diversity)
    rows = np.arange(n_rows)
    left = valid.copy()
    # before the first pick nothing is picked: no penalty; afterwards the max similarity to the
    # picked ones (negative when every picked anime is unlike this one)
    max_sim = np.zeros((n_rows, n), np.float64)
    picked_any = np.zeros(n_rows, bool)
    base = np.where(valid, (1 - lam) * np.where(valid, rel, 0.0), -np.inf)
    order = np.full((n_rows, k), -1, np.int64)
    for step in range(k):
        obj = np.where(left, base - lam * max_sim, -np.inf)
        j = obj.argmax(axis=1)
        ok = left[rows, j]
        if not ok.any():
            break
        order[:, step] = np.where(ok, j, -1)
        left[rows[ok], j[ok]] = False
        s_j = sim[rows, j].astype(np.float64)  # (n_rows, n): similarity to the new pick
        first = ok & ~picked_any
        max_sim = np.where(first[:, None], s_j, np.where(ok[:, None], np.maximum(max_sim, s_j), max_sim))
        picked_any |= ok
    return order[0] if single else order

"""Graph features from MyAnimeList's recommendation pairs ("if you liked A, watch B").

A pair is item side information written by users on the anime's page, so it exists for an anime
that has no interactions in our data: DeepAniNet fed it to the item tower through graph
convolutions. Two features come from it:

- `propagate`: content smoothed over the graph (APPNP-style personalised PageRank,
  h ← (1-α)·x + α·Â·h), so an anime's vector also says what its neighbours are about;
- `neighbour_mean`: the weighted mean of the *known* neighbours' vectors (e.g. WMF factors of
  training items), which hands a cold anime the preference signal of the anime it is paired with.

Both are exact linear algebra on a row-normalised adjacency; an anime without edges keeps its own
vector (propagate) or gets zeros (neighbour_mean). A brand-new anime added at serving time has no
pairs yet, so it enters with the no-edge values, the same as a cold item without pairs offline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def rec_graph(recs: pd.DataFrame, item_ids: np.ndarray, min_users: int = 1) -> sp.csr_matrix:
    """Symmetric weighted adjacency over `item_ids` (rows/columns aligned to it).

    recs: columns anime_id, rec_anime_id, num_users (how many users submitted the pair). The
    weight of an edge is log(1 + total num_users over both directions): a pair recommended by
    hundreds of users is stronger evidence than one by a single user, with diminishing returns.
    Pairs naming an anime outside item_ids, self-pairs and pairs below min_users are dropped.
    """
    n = len(item_ids)
    pos = pd.Series(np.arange(n), index=pd.Index(np.asarray(item_ids)))
    a = recs["anime_id"].map(pos)
    b = recs["rec_anime_id"].map(pos)
    w = recs["num_users"].astype(float)
    keep = a.notna() & b.notna() & (a != b) & (w >= min_users)
    a, b, w = a[keep].to_numpy(np.int64), b[keep].to_numpy(np.int64), w[keep].to_numpy()
    m = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n))
    m = m.tocsr()  # duplicates (A→B and B→A) are summed here
    m.sum_duplicates()
    m.data = np.log1p(m.data).astype(np.float32)
    return m


def row_normalise(adj: sp.csr_matrix) -> sp.csr_matrix:
    deg = np.asarray(adj.sum(axis=1)).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg, dtype=np.float64), where=deg > 0)
    return (sp.diags(inv) @ adj).tocsr()


def propagate(x: np.ndarray, adj: sp.csr_matrix, alpha: float = 0.5, hops: int = 2) -> np.ndarray:
    """h_0 = x; h_{t+1} = (1-α)·x + α·Â·h_t for `hops` steps, Â row-normalised. Rows without
    edges stay x (their Â row is empty, so they get (1-α)·x + 0: rescaled back to x)."""
    if not 0 <= alpha < 1:
        raise ValueError("alpha must be in [0, 1)")
    x = np.asarray(x, np.float32)
    a_hat = row_normalise(adj)
    has_edges = np.asarray(adj.getnnz(axis=1)) > 0
    h = x
    for _ in range(hops):
        h = (1 - alpha) * x + alpha * np.asarray(a_hat @ h, np.float32)
        h[~has_edges] = x[~has_edges]
    return h.astype(np.float32)


def neighbour_mean(x: np.ndarray, adj: sp.csr_matrix, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the rows of x over each item's neighbours that are `known` (boolean
    mask, e.g. items with training interactions); zeros where an item has no known neighbour.
    Also returns the total edge weight to known neighbours (0 = no signal), which callers can
    use as a confidence feature. An item's own row never contributes (no self-loops)."""
    x = np.asarray(x, np.float32)
    mask = sp.diags(np.asarray(known, bool).astype(np.float32))
    a = (adj @ mask).tocsr()
    a.eliminate_zeros()
    weight = np.asarray(a.sum(axis=1)).ravel().astype(np.float32)
    out = np.asarray(row_normalise(a) @ x, np.float32)
    return out, weight


def graph_preference_features(V: np.ndarray, adj: sp.csr_matrix, known: np.ndarray) -> np.ndarray:
    """The item-tower content block DropoutNet reads for the graph: mean WMF factors of the known
    neighbours plus log(1 + edge weight to them), so the tower can tell "no neighbours" from
    "neighbours with small factors"."""
    mean, weight = neighbour_mean(V, adj, known)
    return np.hstack([mean, np.log1p(weight)[:, None]]).astype(np.float32)

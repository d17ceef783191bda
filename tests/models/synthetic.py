"""A tiny two-taste world for model tests: users of cluster A like items of cluster A, and item
text vectors say which cluster an item is in. Some items of each cluster are cold (no interactions)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def two_cluster_world(n_users=60, n_items=40, n_cold=8, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    user_cluster = np.arange(n_users) % 2
    item_cluster = np.arange(n_items) % 2
    cold = np.arange(n_items - n_cold, n_items)  # last items: never interacted with
    rows, cols = [], []
    for u in range(n_users):
        same = np.flatnonzero((item_cluster == user_cluster[u]) & (np.arange(n_items) < n_items - n_cold))
        liked = rng.choice(same, size=8, replace=False)
        rows += [u] * len(liked)
        cols += liked.tolist()
    train = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    centres = rng.normal(size=(2, dim)).astype(np.float32)
    content = centres[item_cluster] + 0.3 * rng.normal(size=(n_items, dim)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    return {
        "train": train,
        "content": content,
        "user_cluster": user_cluster,
        "item_cluster": item_cluster,
        "cold": cold,
    }

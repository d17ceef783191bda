"""Most-popular-first: the same ranking for every query, by training positives per item.

The simplest baseline, the last-resort fallback, and the reference that a model which "learns
preferences" must beat on in-cluster recommendations.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .base import Queries, Recommender


class Popularity(Recommender):
    name = "popularity"
    learns_preferences = False

    def __init__(self) -> None:
        super().__init__()
        self.counts: np.ndarray | None = None
        self._scores: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> "Popularity":
        self.train = train.tocsr().astype(np.float32)
        n_items = self.train.shape[1]
        self.counts = np.asarray((self.train > 0).sum(axis=0)).ravel().astype(np.int64)
        # Score = 1 - rank / n_items in the order (count desc, item index asc): monotone in the
        # count with ties broken by index, and every item distinct in float32, which a count
        # plus a tiny epsilon would not be once counts reach the thousands.
        order = np.lexsort((np.arange(n_items), -self.counts))
        self._scores = np.empty(n_items, np.float32)
        self._scores[order] = 1.0 - np.arange(n_items, dtype=np.float64) / n_items
        return self

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        assert self._scores is not None, "fit() first"
        row = self._scores[np.asarray(items, dtype=np.int64)]
        return np.repeat(row[None, :], len(queries), axis=0)

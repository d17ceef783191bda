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

    def __init__(self, seed: int | None = 0) -> None:
        """seed: order of ties (a seeded random permutation); None breaks ties by item index,
        which only hand-computed examples should use."""
        super().__init__()
        self.seed = seed
        self.counts: np.ndarray | None = None
        self._scores: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> "Popularity":
        self.train = train.tocsr().astype(np.float32)
        n_items = self.train.shape[1]
        self.counts = np.asarray((self.train > 0).sum(axis=0)).ravel().astype(np.int64)
        # Score = 1 - rank / n_items in the order (count desc, then a seeded random order): monotone
        # in the count, every item distinct in float32 (a count plus a tiny epsilon would not be
        # once counts reach the thousands). Ties must not follow the item index: MAL ids grow
        # with air date, so index order would smuggle an "older is more watched" signal into
        # the ranking of cold items, which all have a count of 0.
        tiebreak = np.arange(n_items) if self.seed is None else np.random.default_rng(self.seed).permutation(n_items)
        order = np.lexsort((tiebreak, -self.counts))
        self._scores = np.empty(n_items, np.float32)
        self._scores[order] = 1.0 - np.arange(n_items, dtype=np.float64) / n_items
        return self

    def params(self) -> dict:
        return {"seed": self.seed}

    def scorable(self, items: np.ndarray) -> np.ndarray:
        """An anime nobody has watched yet has no popularity to rank it by."""
        assert self.counts is not None, "fit() first"
        return self.counts[np.asarray(items, np.int64)] > 0

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        assert self._scores is not None, "fit() first"
        row = self._scores[np.asarray(items, dtype=np.int64)]
        return np.repeat(row[None, :], len(queries), axis=0)

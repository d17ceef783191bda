"""Content nearest neighbours: cosine between a user's content profile and each item's text vector.

The profile is the confidence-weighted mean of the liked items' vectors. Vectors should be centred
(anime2vec.features.whiten) first: raw sentence embeddings share a dominant direction, and a mean
of many liked shows then points at "generic anime" rather than at the user's taste.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from .base import Queries, Recommender


class ContentKNN(Recommender):
    learns_preferences = True

    def __init__(self, features, name: str = "content-knn", day_one_features=None):
        """features: (n_items, d) dense array or sparse matrix, rows aligned to item indices.
        day_one_features: the rows an anime has on the day it airs, where `features` mix in
        information written later (graph propagation); `day_one` scores from those."""
        super().__init__()
        self.name = name
        self.features = self._norm(features)
        self.day_one_features = day_one_features

    @staticmethod
    def _norm(x):
        return normalize(x) if sp.issparse(x) else normalize(np.asarray(x, np.float32))

    def day_one(self, items: np.ndarray) -> "ContentKNN":
        if self.day_one_features is None:
            return self
        items = np.asarray(items, np.int64)
        f = self.features.copy()
        f[items] = self._norm(np.asarray(self.day_one_features)[items])
        view = copy.copy(self)
        view.features = f
        return view

    def fit(self, train: sp.csr_matrix) -> "ContentKNN":
        self.train = train.tocsr().astype(np.float32)
        return self

    def profiles(self, queries: Queries):
        h = queries.history_matrix(self.train)
        prof = h @ self.features
        return normalize(prof) if sp.issparse(prof) else normalize(np.asarray(prof))

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        prof = self.profiles(queries)
        s = prof @ self.features[items].T
        return np.asarray(s.todense() if sp.issparse(s) else s, dtype=np.float32)

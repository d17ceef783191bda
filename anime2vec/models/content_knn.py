"""Content nearest neighbours: cosine between a user's content profile and each item's text vector.

The profile is the confidence-weighted mean of the liked items' vectors. Vectors should be centred
(anime2vec.features.whiten) first: raw sentence embeddings share a dominant direction, and a mean
of many liked shows then points at "generic anime" rather than at the user's taste.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from .base import Queries, Recommender


class ContentKNN(Recommender):
    learns_preferences = True

    def __init__(self, features, name: str = "content-knn"):
        """features: (n_items, d) dense array or sparse matrix, rows aligned to item indices."""
        super().__init__()
        self.name = name
        self.features = normalize(features) if sp.issparse(features) else normalize(np.asarray(features, np.float32))

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

"""Item-kNN collaborative filtering ("top-K CF"): implicit's cosine item-item neighbourhoods.

Score of item j for a history h = sum_i h_i * sim(i, j) over the K nearest neighbours of each i.
Strong on favourites queries of popular shows; blind to items nobody has interacted with.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from implicit.nearest_neighbours import CosineRecommender

from .base import Queries, Recommender


class ItemKNN(Recommender):
    name = "item-knn"
    learns_preferences = True

    def __init__(self, K: int = 100, binary: bool = True):
        super().__init__()
        self.K, self.binary = K, binary

    def params(self) -> dict:
        return {"K": self.K, "binary": self.binary}

    def fit(self, train: sp.csr_matrix) -> "ItemKNN":
        self.train = train.tocsr().astype(np.float32)
        x = self.train.copy().tocsr()
        if self.binary:  # cosine on who-watched-what; confidence only weighs the query side
            x.data[:] = 1.0
        model = CosineRecommender(K=self.K)
        model.fit(x, show_progress=False)
        # similarity[i, j]: neighbours j of item i
        self.similarity = model.similarity.tocsr().astype(np.float32)
        return self

    def scorable(self, items: np.ndarray) -> np.ndarray:
        assert self.train is not None, "fit() first"
        return np.asarray(self.train.getnnz(axis=0)).ravel()[np.asarray(items, np.int64)] > 0

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        h = queries.history_matrix(self.train)
        return np.asarray((h @ self.similarity[:, items]).todense(), dtype=np.float32)

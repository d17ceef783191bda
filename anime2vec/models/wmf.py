"""Weighted matrix factorisation: implicit's ALS (Hu, Koren & Volinsky) on the confidence matrix.

Known users use their trained factors; favourites queries are folded in (one ALS half-step against
the fixed item factors, `recalculate_user`), which is also how serving updates a user online.
Items without training interactions end with V = 0: WMF cannot rank them (the cold-start gap).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from .base import Queries, Recommender


class WMF(Recommender):
    name = "wmf"
    learns_preferences = True

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 10.0,
        iterations: int = 15,
        seed: int = 0,
        threads: int = 0,
    ):
        super().__init__()
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed, self.threads = iterations, seed, threads
        self.U: np.ndarray | None = None
        self.V: np.ndarray | None = None

    def params(self) -> dict:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "seed": self.seed,
        }

    def _als(self) -> AlternatingLeastSquares:
        return AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            random_state=self.seed,
            num_threads=self.threads,
            calculate_training_loss=False,
        )

    def fit(self, train: sp.csr_matrix) -> "WMF":
        self.train = train.tocsr().astype(np.float32)
        self.model = self._als()
        with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads would oversubscribe
            self.model.fit(self.train, show_progress=False)
        self.U = np.ascontiguousarray(self.model.user_factors, dtype=np.float32)
        self.V = np.ascontiguousarray(self.model.item_factors, dtype=np.float32)
        # items with no training signal are exactly cold: make that explicit rather than rely on
        # the solver leaving them at zero
        self.V[np.asarray(self.train.getnnz(axis=0)).ravel() == 0] = 0.0
        self.U[np.asarray(self.train.getnnz(axis=1)).ravel() == 0] = 0.0
        return self

    @classmethod
    def from_factors(cls, U: np.ndarray, V: np.ndarray, train: sp.csr_matrix, **params) -> "WMF":
        """Rebuild a fitted model from stored factors (bundles), without refitting."""
        m = cls(factors=U.shape[1], **params)
        m.train = train.tocsr().astype(np.float32)
        m.U, m.V = np.ascontiguousarray(U, np.float32), np.ascontiguousarray(V, np.float32)
        m.model = m._als()
        m.model.user_factors, m.model.item_factors = m.U, m.V
        return m

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User factors for arbitrary histories against the fixed item factors (ALS fold-in)."""
        history = history.tocsr().astype(np.float32)
        out = np.zeros((history.shape[0], self.factors), np.float32)
        nonempty = np.flatnonzero(history.getnnz(axis=1))
        if len(nonempty):
            out[nonempty] = self.model.recalculate_user(np.arange(len(nonempty)), history[nonempty])
        return out

    def fold_in_one(self, items: np.ndarray, confidences: np.ndarray) -> np.ndarray:
        """`fold_in` of one history given as item positions and confidences, without a sparse matrix
        (the serving path: a few liked anime per request, where building the CSR cost more than the
        solve). The same normal equations as implicit's `recalculate_user`:
        (VᵀV + λI + Σᵢ (αcᵢ − 1) vᵢvᵢᵀ) u = Σᵢ αcᵢ vᵢ, repeated items summed as a CSR would."""
        items = np.asarray(items, np.int64)
        if len(items) == 0:
            return np.zeros(self.factors, np.float32)
        assert self.V is not None, "fit() first"
        items, where = np.unique(items, return_inverse=True)
        c = self.alpha * np.bincount(where, weights=np.asarray(confidences, np.float64))
        Y = self.V[items].astype(np.float64)
        A = self._gram() + (Y.T * (c - 1.0)) @ Y
        return np.linalg.solve(A, Y.T @ c).astype(np.float32)

    def _gram(self) -> np.ndarray:
        """VᵀV + λI, computed once per item-factor matrix."""
        assert self.V is not None, "fit() first"
        cached = getattr(self, "_gram_cache", None)
        if cached is None or cached[0] is not self.V:
            g = self.V.T.astype(np.float64) @ self.V.astype(np.float64) + self.regularization * np.eye(self.factors)
            cached = self._gram_cache = (self.V, g)
        return cached[1]

    def user_vectors(self, queries: Queries) -> np.ndarray:
        if queries.users is not None:
            assert self.U is not None, "fit() first"
            return self.U[queries.users]
        return self.fold_in(queries.history_matrix(self.train))

    def scorable(self, items: np.ndarray) -> np.ndarray:
        assert self.V is not None, "fit() first"
        return np.any(self.V[np.asarray(items, np.int64)] != 0, axis=1)

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        assert self.V is not None, "fit() first"
        return self.user_vectors(queries) @ self.V[items].T

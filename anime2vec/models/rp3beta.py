"""RP3beta (Paudel et al. 2017; Dacrema et al. 2019's strong baseline): item-item similarity from
three-step random walks item → user → item, raised to α and divided by the target's popularity^β.

    W_ij = (Σ_u P(u|i) P(j|u))^α / pop_j^β,  top-K per row,  score_j = Σ_i x_i W_ij

P(u|i) and P(j|u) are the row-normalised binary interaction matrices. β > 0 lifts less popular
items; items with no training interaction have no walk into them and cannot be scored.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from .base import Queries, Recommender


class RP3beta(Recommender):
    name = "rp3beta"
    learns_preferences = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, K: int = 200, block: int = 1024, name: str = "rp3beta"):
        super().__init__()
        self.alpha, self.beta, self.K, self.block, self.name = float(alpha), float(beta), int(K), block, name
        self.W: sp.csr_matrix | None = None

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "K": self.K}

    def fit(self, train: sp.csr_matrix) -> "RP3beta":
        self.train = train.tocsr().astype(np.float32)
        x = self.train.copy()
        x.data[:] = 1.0
        pop = np.asarray(x.sum(axis=0)).ravel()
        p_ui = normalize(x, norm="l1", axis=1)  # P(j | u)
        p_iu = normalize(x.T.tocsr(), norm="l1", axis=1)  # P(u | i)
        n = x.shape[1]
        penalty = np.where(pop > 0, np.power(np.maximum(pop, 1.0), -self.beta), 0.0)
        rows, cols, vals = [], [], []
        for s in range(0, n, self.block):  # dense blocks of rows, top-K kept: memory stays O(block · n)
            w = np.asarray((p_iu[s : s + self.block] @ p_ui).todense())
            if self.alpha != 1.0:
                np.power(w, self.alpha, out=w)
            w *= penalty[None, :]
            k = min(self.K, n)
            top = np.argpartition(-w, k - 1, axis=1)[:, :k]
            v = np.take_along_axis(w, top, axis=1)
            keep = v > 0
            r = np.repeat(np.arange(s, s + len(w)), k).reshape(len(w), k)
            rows.append(r[keep])
            cols.append(top[keep])
            vals.append(v[keep])
        self.W = sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        )
        self._scorable = pop > 0
        return self

    def scorable(self, items: np.ndarray) -> np.ndarray:
        return self._scorable[np.asarray(items, np.int64)]

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        assert self.W is not None, "fit() first"
        h = queries.history_matrix(self.train)
        return np.asarray((h @ self.W[:, np.asarray(items, np.int64)]).todense(), dtype=np.float32)

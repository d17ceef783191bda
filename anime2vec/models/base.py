"""One interface every recommender implements, batch-first (after `implicit`).

A model scores a batch of *queries* against a set of candidate items. A query is either a known
user (a row of the training matrix) or a set of liked items (a favourites query: a cold user).
`recommend` is written once here on top of `score`; models only implement `fit` and `score`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Queries:
    """A batch of requests. Exactly one of `users` / `liked` is set.

    users: (n,) user row indices into the training matrix (known users: their training history).
    liked: n arrays of item indices (favourites queries; the user is not in the training matrix).
    liked_weights: optional n arrays of confidences aligned with `liked` (default: all 1).
    """

    users: np.ndarray | None = None
    liked: tuple[np.ndarray, ...] | None = None
    liked_weights: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        if (self.users is None) == (self.liked is None):
            raise ValueError("Queries needs exactly one of users / liked")

    def __len__(self) -> int:
        return len(self.users) if self.users is not None else len(self._liked_sets)

    @property
    def _liked_sets(self) -> tuple[np.ndarray, ...]:
        """`liked`, for a favourites batch (set whenever `users` is not: see __post_init__)."""
        assert self.liked is not None, "a batch of known users has no liked sets"
        return self.liked

    @classmethod
    def of_users(cls, users) -> "Queries":
        return cls(users=np.asarray(users, dtype=np.int64))

    @classmethod
    def of_liked(cls, liked, weights=None) -> "Queries":
        lk = tuple(np.asarray(x, dtype=np.int64) for x in liked)
        wt = None if weights is None else tuple(np.asarray(w, dtype=np.float32) for w in weights)
        return cls(liked=lk, liked_weights=wt)

    def slice(self, start: int, stop: int) -> "Queries":
        if self.users is not None:
            return Queries(users=self.users[start:stop])
        wt = None if self.liked_weights is None else self.liked_weights[start:stop]
        return Queries(liked=self._liked_sets[start:stop], liked_weights=wt)

    def history_matrix(self, train: sp.csr_matrix) -> sp.csr_matrix:
        """(n, n_items) confidence rows: training rows for known users, the liked sets otherwise."""
        if self.users is not None:
            return train[self.users]
        n_items = train.shape[1]
        liked = self._liked_sets
        rows = np.repeat(np.arange(len(liked)), [len(x) for x in liked])
        cols = np.concatenate(liked) if liked else np.zeros(0, np.int64)
        if self.liked_weights is None:
            vals = np.ones(len(cols), np.float32)
        else:
            vals = np.concatenate(self.liked_weights).astype(np.float32)
        m = sp.csr_matrix((vals, (rows, cols)), shape=(len(liked), n_items), dtype=np.float32)
        m.sum_duplicates()
        return m


class Recommender(ABC):
    """Base class. `fit(train)` then `score(queries, items)`; `recommend` is derived."""

    name: str = "base"

    def __init__(self) -> None:
        self.train: sp.csr_matrix | None = None

    @abstractmethod
    def fit(self, train: sp.csr_matrix) -> "Recommender":
        """train: (n_users, n_items) float32 confidence matrix of training positives."""

    @abstractmethod
    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        """(len(queries), len(items)) float32 scores; higher is better. Must not depend on the
        order of `items` beyond following it, and must be finite."""

    def params(self) -> dict:
        """Hyper-parameters, recorded in reports and bundle manifests."""
        return {}

    def scorable(self, items: np.ndarray) -> np.ndarray:
        """Boolean mask over `items`: which ones this model has any information about. A
        collaborative model cannot score an anime nobody interacted with; `recommend` never
        returns such items and the evaluation ranks them below every scored one, instead of
        letting a made-up score of 0 compete."""
        return np.ones(len(items), bool)

    def day_one(self, items: np.ndarray) -> "Recommender":
        """This model as it would score `items` on the day they air: without any side information
        written after release (e.g. recommendation pairs). Models that use none return self."""
        return self

    def recommend(
        self,
        queries: Queries,
        k: int,
        items: np.ndarray | None = None,
        exclude: sp.csr_matrix | None = None,
        batch_size: int = 512,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores per query, best first.

        items: candidate item indices (default: every item). exclude: (len(queries), n_items)
        sparse matrix whose non-zeros are never returned (e.g. the query's own history).
        Rows with fewer than k admissible candidates are padded with -1 / -inf.
        """
        assert self.train is not None, "fit() first"
        n_items = self.train.shape[1]
        items = np.arange(n_items) if items is None else np.asarray(items, dtype=np.int64)
        k = int(min(k, len(items)))
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        pos = np.full(n_items, -1, dtype=np.int64)
        pos[items] = np.arange(len(items))
        known = np.asarray(self.scorable(items), bool)
        for start in range(0, len(queries), batch_size):
            stop = min(start + batch_size, len(queries))
            s = np.asarray(self.score(queries.slice(start, stop), items), dtype=np.float32).copy()
            s[:, ~known] = -np.inf
            if exclude is not None:
                ex = exclude[start:stop].tocoo()
                p = pos[ex.col]
                ok = p >= 0
                s[ex.row[ok], p[ok]] = -np.inf
            top = (
                np.argpartition(-s, k - 1, axis=1)[:, :k]
                if k < s.shape[1]
                else np.tile(np.arange(s.shape[1]), (len(s), 1))
            )
            ts = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-ts, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            ts = np.take_along_axis(ts, order, axis=1)
            idx = items[top]
            idx[~np.isfinite(ts)] = -1
            out_i[start:stop], out_s[start:stop] = idx, ts
        return out_i, out_s

"""A loaded bundle as a `Recommender`: the one adapter through which anything offline (the retrain
gate, the trade-off experiment, the behavioural suite) evaluates the model exactly as the ranker
serves it, with `evaluation.protocol.Experiment` like every other model.

The adapter answers in an *evaluation space*: item and user indices of a dataset (`item_ids`,
`user_ids` map them to anime and user ids), which need not be the bundle's own (a candidate and
the current version are trained on different data and are compared on the same scenarios).
Per query it takes the ranker's path:
  favourites   ServingModel.favourites_vector of the liked anime the bundle knows;
  a user with feedback events   serving_model.users.compute_user (the fold-in the ranker stores);
  a training user               ServingModel.user_vector;
then the query vector · the served item vectors (what the Qdrant collection holds, exact search),
else the WMF fallback, else popularity. A query the ranker would answer NOT_FOUND (no liked anime
it knows, a user it has never seen) scores -inf everywhere: nothing is ranked, recall 0. Anime the
bundle does not hold are not `scorable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from ..feedback import FeedbackEvent
from ..models.base import Queries, Recommender
from . import users
from .model import ServingModel


class ServedRecommender(Recommender):
    """`model` answering over `item_ids` / `user_ids` (evaluation index → id). `train`: the
    evaluation data's training matrix, whose index space the adapter answers in (the bundle's own
    training data is `model.train`); `events`: feedback events per user id, as the ranker holds
    them. `served_by` counts which path answered each query `recommend` ranked ("dropoutnet": the
    served vectors, "wmf", "popularity", "not_found"; an Experiment also calls `score` for the
    full-ranking MRR, which is not counted again)."""

    def __init__(
        self,
        model: ServingModel,
        item_ids: np.ndarray,
        user_ids: np.ndarray,
        train: sp.csr_matrix,
        events: Mapping[int, list[FeedbackEvent]] | None = None,
        name: str | None = None,
    ):
        super().__init__()
        if train.shape[1] != len(item_ids):
            raise ValueError(f"train has {train.shape[1]} items, item_ids {len(item_ids)}")
        self.model, self.version = model, model.version
        self.name = name or f"served {model.manifest.get('model', 'model')} {model.version}"
        self.item_ids = np.asarray(item_ids, np.int64)
        self.user_ids = np.asarray(user_ids, np.int64)
        self.train = train
        self.events: Mapping[int, list[FeedbackEvent]] = events or {}
        # evaluation item index -> bundle row (-1: the bundle does not hold that anime)
        self._col = np.array([model.pos.get(int(a), -1) for a in self.item_ids], np.int64)
        self.served_by: dict[str, int] = {}
        self._counting = False
        self._last: dict[tuple, tuple[np.ndarray | None, str]] = {}

    def fit(self, train: sp.csr_matrix) -> ServedRecommender:
        return self  # a bundle is trained already; evaluating it never refits it

    def params(self) -> dict:
        return {"bundle": self.version}

    def scorable(self, items: np.ndarray) -> np.ndarray:
        return self._col[np.asarray(items, np.int64)] >= 0

    def recommend(self, queries: Queries, k: int, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        self._counting = True
        try:
            return super().recommend(queries, k, *args, **kwargs)
        finally:
            self._counting = False

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        col = self._col[np.asarray(items, np.int64)]
        have = col >= 0
        out = np.zeros((len(queries), len(col)), np.float32)
        # an Experiment scores each batch twice (its top lists, then the full-ranking MRR): the
        # previous call's answers are reused, so each query's vector is built once
        answers: dict[tuple, tuple[np.ndarray | None, str]] = {}
        for r in range(len(queries)):
            key = self._key(queries, r)
            s, by = answers[key] = answers.get(key) or self._last.get(key) or self.bundle_scores(queries, r)
            if self._counting:
                self.served_by[by] = self.served_by.get(by, 0) + 1
            if s is None:
                out[r] = -np.inf
            else:
                out[r, have] = s[col[have]]
        self._last = answers
        return out

    @staticmethod
    def _key(queries: Queries, r: int) -> tuple:
        if queries.liked is not None:
            w = None if queries.liked_weights is None else tuple(queries.liked_weights[r].tolist())
            return ("liked", tuple(queries.liked[r].tolist()), w)
        assert queries.users is not None
        return ("user", int(queries.users[r]))

    def bundle_scores(self, queries: Queries, r: int) -> tuple[np.ndarray | None, str]:
        """Query r's scores over the bundle's items (model.item_ids order) and the path that
        answered; None: NOT_FOUND."""
        m = self.model
        if queries.liked is not None:
            anime = self.item_ids[queries.liked[r]]
            weights = None if queries.liked_weights is None else queries.liked_weights[r]
            keep = [j for j, a in enumerate(anime) if int(a) in m.pos]
            if not keep:
                return None, "not_found"
            liked = [int(anime[j]) for j in keep]
            w = None if weights is None else [float(weights[j]) for j in keep]
            vec = m.favourites_vector(liked, w) if m.has_vectors else None
            return self._answer(vec, lambda: m.wmf_scores_favourites(liked, w))
        assert queries.users is not None
        uid = int(self.user_ids[queries.users[r]])
        evs = self.events.get(uid)
        if evs:
            user = users.compute_user(m, {}, uid, evs)  # no anime added offline
            return self._answer(user.vector, lambda: users.wmf_scores(m, user.listed))
        if uid in m.user_pos:
            vec = m.user_vector(uid) if m.has_vectors else None
            return self._answer(vec, lambda: m.wmf_scores_user(uid))
        return None, "not_found"

    def _answer(self, vec: np.ndarray | None, wmf: Callable[[], np.ndarray | None]) -> tuple[np.ndarray, str]:
        if vec is not None:
            return self.model.item_tower @ vec, "dropoutnet"
        s = wmf()
        return (s, "wmf") if s is not None else (self.model.popularity, "popularity")


class ServedPopularity(ServedRecommender):
    """The ranker's last fallback of one bundle (MAL members, then training counts): the floor a
    first bundle must beat."""

    def bundle_scores(self, queries: Queries, r: int) -> tuple[np.ndarray | None, str]:
        return self.model.popularity, "popularity"


def training_leak(model: ServedRecommender, scenarios: Sequence) -> float:
    """Fraction of the scenarios' truth (user, anime) pairs that are in the bundle's training
    matrix: 0 when the evaluation data is unseen; above 0 the comparison flatters that bundle."""
    m, n, leaked = model.model, 0, 0
    for sc in scenarios:
        for j, u in enumerate(sc.users):
            truth = model.item_ids[sc.truth[j].indices]
            n += len(truth)
            b = m.user_pos.get(int(model.user_ids[u]))
            if b is None:
                continue
            seen = set(m.item_ids[m.train[b].indices].tolist())
            leaked += sum(int(a) in seen for a in truth)
    return leaked / n if n else 0.0

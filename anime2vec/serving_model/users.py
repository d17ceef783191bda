"""A user's list and serving vector from their feedback events, for the ranker's online users
(services/ranker/online_users.py stores and caches them) and for the retraining gate, which scores
users with feedback exactly as the ranker serves them.

  1. their list: the training history (if the model was trained on them) with every anime an
     event named replaced by what the events say (`user_confidences`, the training rules);
  2. their serving vector, built exactly as the serving path builds one from a history (the
     hybrid reads the list itself: no re-solve): a training user as a known user (the "users"
     weights), a user known only through feedback as a favourites query of their liked anime
     (the "favourites" weights); the WMF fallback still re-solves their factors (ALS fold-in).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from anime2vec.feedback import FeedbackEvent, user_confidences
from anime2vec.serving_model.model import ServingModel


@dataclass
class OnlineUser:
    """What RecommendForUser needs for one feedback-updated user."""

    user_id: int
    version: str
    vector: np.ndarray | None  # serving query vector; None when nothing liked is in the model
    listed: dict[int, float]  # the user's whole list: anime_id -> confidence (0: not liked)
    updated_at: float = 0.0
    event_ids: set[str] = field(default_factory=set)

    @property
    def liked(self) -> dict[int, float]:
        return {a: c for a, c in self.listed.items() if c > 0}


def compute_user(m: ServingModel, extra: Mapping[int, Any], user_id: int, events: list[FeedbackEvent]) -> OnlineUser:
    """A user's list and serving vector for the model's version, from their events (steps 1-2 of
    the module docstring); `extra`: anime added since the bundle (ServingModel.favourites_vector).
    With no events, a training user gets their training history re-solved."""
    feedback = user_confidences(events)
    named = {int(e.anime_id) for e in events}
    listed: dict[int, float] = {}
    u = m.user_pos.get(user_id)
    if u is not None:  # training history, minus whatever the events now say about those anime
        row = m.train[u]
        listed = {
            int(m.item_ids[i]): float(c) for i, c in zip(row.indices, row.data) if int(m.item_ids[i]) not in named
        }
    listed.update(feedback)
    vector = None
    if m.has_vectors:
        vector = known_user_vector(m, listed) if u is not None else favourites_user_vector(m, extra, listed)
    return OnlineUser(user_id, m.version, vector, listed, time.time(), {e.event_id for e in events})


def history_row(m, listed: dict[int, float]) -> sp.csr_matrix:
    """The liked bundle items of a list as one confidence row over the model's items."""
    idx = [(m.pos[a], c) for a, c in listed.items() if c > 0 and a in m.pos]
    cols = np.asarray([i for i, _ in idx], np.int64)
    vals = np.asarray([c for _, c in idx], np.float32)
    return sp.csr_matrix((vals, (np.zeros(len(cols), np.int64), cols)), shape=(1, len(m.item_ids)))


def known_user_vector(m, listed: dict[int, float]) -> np.ndarray | None:
    """A training user's vector from their updated list, exactly as ServingModel.user_vector
    builds one from the training row: the hybrid reads a history, no re-solve is needed."""
    h = history_row(m, listed)
    if h.nnz == 0:
        return None
    return m.history_vector(h, "users", int(h.nnz))


def favourites_user_vector(m: ServingModel, extra: Mapping[int, Any], listed: dict[int, float]) -> np.ndarray | None:
    """A user known only through feedback: a favourites query of their liked anime, weighted by
    confidence (ServingModel.favourites_vector, which folds them in)."""
    liked = [(a, c) for a, c in listed.items() if c > 0 and (a in m.pos or a in extra)]
    if not liked:
        return None
    return m.favourites_vector([a for a, _ in liked], [c for _, c in liked], extra)


def wmf_scores(m, listed: dict[int, float]) -> np.ndarray | None:
    """WMF fallback scores from the re-solved factors (None when no liked anime is warm)."""
    h = history_row(m, listed)
    if not any(m.warm[i] for i in h.indices):
        return None
    return m.wmf.V @ m.wmf.fold_in(h)[0]

"""The served scorer: DropoutNet blended with WMF and content cosines, as ONE dot product.

    score(u, i) = a·Û_u·V̂_i/s_dn + b·U_u·V_i/s_wmf + c·cos(φ_u, φ_i)/s_c
                  + e·cos(ψ_u, ψ_i)/s_t + d·[i is cold]

(φ: centred MiniLM vectors, ψ: SVD-reduced TF-IDF.) Each term is divided by the spread (std)
of its scores so the weights are comparable. Every term is a dot product, so the blend is a dot
product of concatenations:
    user  [a·Û ; b·U ; c·φ̂_u ; e·ψ̂_u ; d]     item  [V̂/s_dn ; V/s_wmf ; φ̂_i/s_c ; ψ̂_i/s_t ; cold_i]
and a vector index ranks exactly like `score`. Cold items have V = 0: only their text speaks,
plus the offset d that puts them on the warm items' scale.

Weights are chosen per request type on the validation split, in two stages: (1) a, b, c, e by
coordinate ascent on the request type's own scenario (known users: warm; favourites queries:
favourites), with d = 0; (2) all five by coordinate ascent on cold-item recall, accepting only
moves that keep the stage-1 score within `tolerance`: new anime get shown, but not at the cost of
the warm recommendations. The tolerance climbs a ladder (2% → 5% → 10% by default in the
pipeline) only as far as needed for the blend to reach its DropoutNet's own cold-item recall.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from .base import Queries, Recommender
from .dropoutnet import DropoutNet

log = logging.getLogger(__name__)
GRIDS = {"a": (0.0, 0.25, 0.5, 1.0, 2.0), "b": (0.0, 0.5, 1.0, 2.0), "c": (0.0, 0.25, 0.5, 1.0, 2.0),
         "e": (0.0, 0.25, 0.5, 1.0, 2.0), "d": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)).astype(np.float32)


@dataclass
class Weights:
    a: float = 1.0   # DropoutNet
    b: float = 1.0   # WMF
    c: float = 0.5   # MiniLM content cosine
    d: float = 0.0   # cold-item offset
    e: float = 0.0   # TF-IDF content cosine

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c, "d": self.d, "e": self.e}


@dataclass
class Scales:
    dn: float = 1.0
    wmf: float = 1.0
    content: float = 1.0
    tfidf: float = 1.0


class Hybrid(Recommender):
    learns_preferences = True

    def __init__(self, dn: DropoutNet, tfidf: np.ndarray | None = None, name: str = "anime2vec-hybrid",
                 content: np.ndarray | None = None):
        """dn: a fitted DropoutNet (its own cold_bias is not used: the offset here is `d`).
        tfidf: (n_items, k) dense TF-IDF projection; None leaves the e-term out.
        content: the text vectors of the c-term (φ); None: the DropoutNet's content. Pass the
        text vectors when the DropoutNet also reads non-text blocks (graph features)."""
        super().__init__()
        self.dn, self.name = dn, name
        self.users = Weights()
        self.favourites = Weights()
        # Free text has no interaction data to tune on: rank by text similarity alone (a
        # content-only Û was measurably worse in spot checks, and a cold offset would flood text
        # results with cold items).
        self.text = Weights(a=0.0, b=0.0, c=1.0, d=0.0, e=0.0)
        self.scales = Scales()
        self.tuning: dict = {}
        self.phi = _unit(dn.content if content is None else content)
        self.psi = _unit(tfidf) if tfidf is not None else np.zeros((len(self.phi), 1), np.float32)

    def params(self) -> dict:
        return {"users": self.users.as_dict(), "favourites": self.favourites.as_dict(),
                "text": self.text.as_dict(), "scales": vars(self.scales), "dropoutnet": self.dn.name,
                "tfidf_dim": int(self.psi.shape[1])}

    def fit(self, train: sp.csr_matrix) -> "Hybrid":
        """The DropoutNet (and its WMF) must be fitted; this measures the score scales."""
        self.train = train.tocsr().astype(np.float32)
        rng = np.random.default_rng(self.dn.config.seed)
        users = np.flatnonzero(self.train.getnnz(axis=1))
        q = Queries.of_users(rng.choice(users, min(256, len(users)), replace=False))
        items = rng.choice(self.train.shape[1], min(2048, self.train.shape[1]), replace=False)
        uh, u, phi_u, psi_u = self.parts(q)
        warm = items[~self.dn.cold_items[items]]
        self.scales = Scales(dn=float(np.std(uh @ self.dn.item_emb[items].T)) or 1.0,
                             wmf=float(np.std(u @ self.dn.wmf.V[warm].T)) or 1.0,
                             content=float(np.std(phi_u @ self.phi[items].T)) or 1.0,
                             tfidf=float(np.std(psi_u @ self.psi[items].T)) or 1.0)
        return self

    def parts(self, queries: Queries) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(Û, U, φ_u, ψ_u) for a batch: own factors for known users, ALS fold-in for favourites;
        content profiles are confidence-weighted means of the items' unit vectors."""
        h = queries.history_matrix(self.train)
        uh = self.dn.user_tower(queries)
        u = self.dn.wmf.U[queries.users] if queries.users is not None else self.dn.wmf.fold_in(h)
        return uh, u, np.asarray(h @ self.phi, np.float32), np.asarray(h @ self.psi, np.float32)

    @classmethod
    def from_params(cls, dn: DropoutNet, params: dict, train: sp.csr_matrix, tfidf: np.ndarray | None = None,
                    name: str = "anime2vec-hybrid", content: np.ndarray | None = None) -> "Hybrid":
        """Rebuild from `params()` (bundles) without re-measuring or re-tuning."""
        h = cls(dn, tfidf=tfidf, name=name, content=content)
        h.train = train.tocsr().astype(np.float32)
        h.users, h.favourites = Weights(**params["users"]), Weights(**params["favourites"])
        if "text" in params:
            h.text = Weights(**params["text"])
        h.scales = Scales(**params["scales"])
        return h

    def weights_for(self, queries: Queries) -> Weights:
        return self.users if queries.users is not None else self.favourites

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        return self.serving_user_vectors(*self.parts(queries), self.weights_for(queries)) @ \
            self.serving_item_vectors(items).T

    # ---- serving form ------------------------------------------------------------------
    def serving_item_vectors(self, items: np.ndarray | None = None, item_emb=None, V=None, phi=None,
                             psi=None, cold=None) -> np.ndarray:
        """[V̂/s_dn ; V/s_wmf ; φ̂/s_c ; ψ̂/s_t ; cold] for catalogue items, or from raw parts (new
        items; psi=None when no TF-IDF is available)."""
        if items is not None:
            item_emb, V, phi, psi, cold = (self.dn.item_emb[items], self.dn.wmf.V[items], self.phi[items],
                                           self.psi[items], self.dn.cold_items[items])
        phi = np.atleast_2d(phi)
        psi = np.zeros((len(phi), self.psi.shape[1]), np.float32) if psi is None else np.atleast_2d(psi)
        s = self.scales
        return np.hstack([item_emb / s.dn, V / s.wmf, _unit(phi) / s.content, _unit(psi) / s.tfidf,
                          np.asarray(cold, np.float32)[:, None]]).astype(np.float32)

    def serving_user_vectors(self, uh: np.ndarray, u: np.ndarray, phi_u: np.ndarray, psi_u: np.ndarray,
                             w: Weights) -> np.ndarray:
        n = len(uh)
        return np.hstack([w.a * uh, w.b * u, w.c * _unit(phi_u), w.e * _unit(psi_u),
                          np.full((n, 1), w.d, np.float32)]).astype(np.float32)

    # ---- selection on validation ---------------------------------------------------------
    def tune(self, evaluate: Callable[["Hybrid", str, str], float], passes: int = 2,
             tolerance: float | tuple[float, ...] = 0.02, cold_target: dict[str, float] | None = None) -> None:
        """Two-stage coordinate ascent per request type (see the module docstring).
        evaluate(model, kind, target) → validation score, kind "users" / "favourites", target
        "own" (warm / favourites scenario) or "cold" (cold items in the whole catalogue).
        tolerance: one value, or a ladder tried in order until the cold score reaches
        cold_target[kind] (e.g. the DropoutNet's own cold recall: the blend should not recommend
        new anime worse than its DropoutNet does); the last rung is kept when none does."""
        ladder = (tolerance,) if isinstance(tolerance, (int, float)) else tuple(tolerance)
        for kind in ("users", "favourites"):
            w: Weights = getattr(self, kind)
            w.d = 0.0
            own = self._ascend(w, lambda: evaluate(self, kind, "own"), ("a", "b", "c", "e"), passes)
            stage1 = w.as_dict()
            trials = []
            for tol in ladder:
                for k, v in stage1.items():
                    setattr(w, k, v)
                floor = own * (1 - tol)

                def constrained() -> float:
                    return evaluate(self, kind, "cold") if evaluate(self, kind, "own") >= floor else -np.inf
                cold = self._ascend(w, constrained, ("d", "a", "c", "e", "b"), passes)
                trials.append({"tolerance": tol, "weights": w.as_dict(), "cold": cold})
                target = None if cold_target is None else cold_target.get(kind)
                if target is None or cold >= target:
                    break
            self.tuning[kind] = {"best": w.as_dict(), "own_stage1": own, "own": evaluate(self, kind, "own"),
                                 "cold": cold, "tolerance": tol, "cold_target": target, "ladder": trials}
            log.info("hybrid %s weights %s (%s)", kind, w.as_dict(), self.tuning[kind])

    def _ascend(self, w: Weights, objective: Callable[[], float], names, passes: int) -> float:
        best = objective()
        for _ in range(passes):
            improved = False
            for name in names:
                keep = getattr(w, name)
                for g in GRIDS[name]:
                    if g == keep:
                        continue
                    setattr(w, name, g)
                    if w.a == w.b == w.c == w.e == 0:
                        continue
                    v = objective()
                    if v > best + 1e-6:
                        best, keep, improved = v, g, True
                setattr(w, name, keep)
            if not improved:
                break
        return best

"""The served scorer: DropoutNet blended with WMF and content cosine, as ONE dot product.

    score(u, i) = a·Û_u·V̂_i/s_dn + b·U_u·V_i/s_wmf + c·cos(φ_u, φ_i)/s_c + d·[i is cold]

Each term is divided by the spread (std) of its scores so the weights are comparable. Because
every term is a dot product, the blend is a dot product of concatenations:
    user  [a·Û ; b·U ; c·φ̂_u ; d]      item  [V̂/s_dn ; V/s_wmf ; φ̂_i/s_c ; cold_i]
so a vector index ranks exactly like `score`. Cold items have V = 0: only their text speaks
(through V̂ and the cosine), plus the offset d that puts them on the warm items' scale.
Weights are chosen per request type on the validation split (known users: cold-whole + warm;
favourites queries: favourites + cold-whole), by coordinate ascent over a small grid.
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
GRIDS = {"a": (0.0, 0.5, 1.0, 2.0), "b": (0.0, 0.5, 1.0, 2.0), "c": (0.0, 0.25, 0.5, 1.0, 2.0),
         "d": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)).astype(np.float32)


@dataclass
class Weights:
    a: float = 1.0   # DropoutNet
    b: float = 1.0   # WMF
    c: float = 0.5   # content cosine
    d: float = 0.0   # cold-item offset

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c, "d": self.d}


@dataclass
class Scales:
    dn: float = 1.0
    wmf: float = 1.0
    content: float = 1.0


class Hybrid(Recommender):
    learns_preferences = True

    def __init__(self, dn: DropoutNet, name: str = "anime2vec-hybrid"):
        """dn: a fitted DropoutNet; its own cold_bias is not used (the offset here is `d`)."""
        super().__init__()
        self.dn, self.name = dn, name
        self.users = Weights()
        self.favourites = Weights()
        self.scales = Scales()
        self.tuning: dict = {}
        self.phi = _unit(dn.content)

    def params(self) -> dict:
        return {"users": self.users.as_dict(), "favourites": self.favourites.as_dict(),
                "scales": vars(self.scales), "dropoutnet": self.dn.name}

    def fit(self, train: sp.csr_matrix) -> "Hybrid":
        """The DropoutNet (and its WMF) must be fitted; this measures the score scales."""
        self.train = train.tocsr().astype(np.float32)
        rng = np.random.default_rng(self.dn.config.seed)
        users = np.flatnonzero(self.train.getnnz(axis=1))
        q = Queries.of_users(rng.choice(users, min(256, len(users)), replace=False))
        items = rng.choice(self.train.shape[1], min(2048, self.train.shape[1]), replace=False)
        uh, u, phi_u = self.parts(q)
        warm = items[~self.dn.cold_items[items]]
        self.scales = Scales(dn=float(np.std(uh @ self.dn.item_emb[items].T)) or 1.0,
                             wmf=float(np.std(u @ self.dn.wmf.V[warm].T)) or 1.0,
                             content=float(np.std(phi_u @ self.phi[items].T)) or 1.0)
        return self

    def parts(self, queries: Queries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Û, U, unit φ_u) for a batch: own factors for known users, ALS fold-in for favourites."""
        h = queries.history_matrix(self.train)
        uh = self.dn.user_tower(queries)
        u = self.dn.wmf.U[queries.users] if queries.users is not None else self.dn.wmf.fold_in(h)
        phi_u = _unit(np.asarray(h @ self.phi))
        return uh, u, phi_u

    @classmethod
    def from_params(cls, dn: DropoutNet, params: dict, train: sp.csr_matrix, name: str = "anime2vec-hybrid") -> "Hybrid":
        """Rebuild from `params()` (bundles) without re-measuring or re-tuning."""
        h = cls(dn, name=name)
        h.train = train.tocsr().astype(np.float32)
        h.users, h.favourites = Weights(**params["users"]), Weights(**params["favourites"])
        h.scales = Scales(**params["scales"])
        return h

    def weights_for(self, queries: Queries) -> Weights:
        return self.users if queries.users is not None else self.favourites

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        return self.serving_user_vectors(*self.parts(queries), self.weights_for(queries)) @ \
            self.serving_item_vectors(items).T

    # ---- serving form ------------------------------------------------------------------
    def serving_item_vectors(self, items: np.ndarray | None = None, item_emb=None, V=None, phi=None,
                             cold=None) -> np.ndarray:
        """[V̂/s_dn ; V/s_wmf ; φ̂/s_c ; cold] for catalogue items, or for raw parts (new items)."""
        if items is not None:
            item_emb, V, phi, cold = (self.dn.item_emb[items], self.dn.wmf.V[items], self.phi[items],
                                      self.dn.cold_items[items])
        s = self.scales
        return np.hstack([item_emb / s.dn, V / s.wmf, _unit(np.atleast_2d(phi)) / s.content,
                          np.asarray(cold, np.float32)[:, None]]).astype(np.float32)

    def serving_user_vectors(self, uh: np.ndarray, u: np.ndarray, phi_u: np.ndarray, w: Weights) -> np.ndarray:
        n = len(uh)
        return np.hstack([w.a * uh, w.b * u, w.c * _unit(phi_u), np.full((n, 1), w.d, np.float32)]).astype(np.float32)

    # ---- selection on validation ---------------------------------------------------------
    def tune(self, evaluate: Callable[["Hybrid", str], float], passes: int = 2) -> None:
        """Coordinate ascent per request type. evaluate(model, kind) → validation score, where
        kind is "users" or "favourites" (the caller decides which scenarios count)."""
        for kind in ("users", "favourites"):
            w: Weights = getattr(self, kind)
            best = evaluate(self, kind)
            trail = [{**w.as_dict(), "val": best}]
            for _ in range(passes):
                for name, grid in GRIDS.items():
                    keep = getattr(w, name)
                    for g in grid:
                        if g == keep:
                            continue
                        setattr(w, name, g)
                        if w.a == w.b == w.c == 0:
                            continue
                        v = evaluate(self, kind)
                        if v > best + 1e-6:
                            best, keep = v, g
                            trail.append({**w.as_dict(), "val": v})
                    setattr(w, name, keep)
            self.tuning[kind] = {"best": w.as_dict(), "val": best, "trail": trail}
            log.info("hybrid %s weights %s (val %.4f)", kind, w.as_dict(), best)

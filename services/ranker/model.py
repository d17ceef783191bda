"""The serving model: one loaded bundle turned into the vectors a request needs.

Every query becomes one vector, so a single Qdrant search over the bundle's item vectors ranks
the whole catalogue, cold and warm items alike. With the served blend (models/hybrid.py) the
item vector is [V̂ ; V ; φ ; ψ ; cold] and the query vector, per request type:
  favourites   → [a·f_U(transform(mean V of liked), mean φ) ; b·fold-in U ; c·mean φ ; e·mean ψ ; d]
  known user   → the same from the user's own U and history (the "users" weights)
  free text    → [· ; 0 ; φ(text) ; 0 ; 0] with the "text" weights (text similarity)
  similar item → a favourites query of that one anime
  new anime    → [f_V(0, φ) ; 0 ; φ ; ψ ; 1]   (a cold item, recommendable at once)
A bundle without the blend serves DropoutNet alone (Û·V̂ plus its cold offset). The WMF
fallback scores in memory (U·V over the bundle's items); popularity needs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from anime2vec.bundle import Bundle
from anime2vec.models.base import Queries
from anime2vec.features.whiten import Whitener
from anime2vec.models.dropoutnet import DropoutNet, DropoutNetConfig
from anime2vec.models.hybrid import Hybrid, _unit
from anime2vec.models.wmf import WMF

log = logging.getLogger(__name__)


@dataclass
class ItemMeta:
    """What the ranker knows about an anime that is not in the bundle arrays (added via UpsertAnime)."""
    anime_id: int
    content: np.ndarray          # whitened content vector
    payload: dict
    tfidf: np.ndarray | None = None   # dense TF-IDF projection of its text
    text: str = ""                     # its synopsis (explanations name the terms it shares)


class ServingModel:
    def __init__(self, bundle: Bundle, device: str | None = None):
        m = bundle.manifest
        self.bundle = bundle
        self.version: str = m["version"]
        self.manifest = m
        self.item_ids = np.asarray(bundle.arrays["item_ids"], np.int64)
        self.pos = {int(a): i for i, a in enumerate(self.item_ids)}
        self.user_ids = np.asarray(bundle.arrays["user_ids"], np.int64)
        self.user_pos = {int(u): i for i, u in enumerate(self.user_ids)}
        self.catalog = bundle.catalog
        # Plain Python columns: a request reads a few rows, and a pandas row lookup costs ~50 µs
        cat = self.catalog
        self.titles: list[str] = [str(t) for t in cat["title"]]
        self.genres: list[list[str]] = [[str(g) for g in (gs if gs is not None else [])] for gs in cat["genres"]]
        self.synopses: list[str] = [x if isinstance(x, str) else "" for x in cat["synopsis"]] \
            if "synopsis" in cat else [""] * len(cat)
        self.content = np.asarray(bundle.arrays["content"], np.float32)
        # DropoutNet may read graph features beside the text (features/graph.py): its input is
        # [content ; graph]. Anime added at serving time have no recommendation pairs yet: zeros.
        graph = bundle.arrays.get("graph_content")
        self.graph_dim = 0 if graph is None else int(np.asarray(graph).shape[1])
        self.dn_content = self.content if graph is None else \
            np.hstack([self.content, np.asarray(graph, np.float32)]).astype(np.float32)
        self.whitener = Whitener.from_dict(bundle.prefixed("whitener"))
        train = bundle.train
        hp = m.get("hyperparameters", {})
        wmf_params = {k: v for k, v in hp.get("wmf", {}).items() if k in ("regularization", "alpha", "iterations", "seed")}
        self.wmf = WMF.from_factors(bundle.arrays["wmf_U"], bundle.arrays["wmf_V"], train, **wmf_params)
        self.train = train
        self.dropoutnet: DropoutNet | None = None
        state = bundle.prefixed("dropoutnet")
        self.hybrid: Hybrid | None = None
        if state:
            cfg = DropoutNetConfig.from_dict(hp.get("dropoutnet", {}))
            dn = self.dropoutnet = DropoutNet.from_state(state, cfg, self.dn_content, self.wmf, device=device)
            if "hybrid" in hp:
                tf = bundle.arrays.get("tfidf_content")
                self.hybrid = Hybrid.from_params(dn, hp["hybrid"], train,
                                                 tfidf=None if tf is None else np.asarray(tf, np.float32),
                                                 content=self.content)
                self.item_tower = self.hybrid.serving_item_vectors(np.arange(len(self.item_ids)))
            else:
                self.item_tower = dn.serving_item_vectors(dn.item_emb, dn.cold_items)
        else:
            log.warning("bundle %s has no DropoutNet weights: serving WMF and popularity only", self.version)
            self.item_tower = np.asarray(bundle.arrays["item_tower"], np.float32)
        self.tfidf = None
        if (bundle.path / "tfidf.npz").is_file():
            from anime2vec.features.tfidf import TfidfFeatures
            self.tfidf = TfidfFeatures.load(bundle.path / "tfidf.npz")
        members = self.catalog["members"].fillna(0).to_numpy(np.float64) if "members" in self.catalog else None
        train_pop = np.asarray((train > 0).sum(axis=0)).ravel().astype(np.float64)
        # popularity prior: MAL members where known, training counts to break ties
        self.popularity = (members if members is not None else train_pop) + 1e-3 * train_pop
        self.warm = np.any(self.wmf.V != 0, axis=1)

    # ---- item metadata -------------------------------------------------------------------
    def payload(self, i: int) -> dict:
        row = self.catalog.iloc[i]
        year = row.get("year")
        return {
            "anime_id": int(self.item_ids[i]), "title": str(row.get("title", "")),
            "genres": [str(g) for g in (row.get("genres") or [])], "type": str(row.get("type") or ""),
            "year": None if year is None or year != year else int(year),
            "members": int(row.get("members") or 0), "cold": not bool(self.warm[i]), "source": "bundle",
        }

    # ---- query vectors -----------------------------------------------------------------
    @property
    def has_dropoutnet(self) -> bool:
        return self.dropoutnet is not None

    def dn_input(self, content: np.ndarray) -> np.ndarray:
        """DropoutNet content input for text vectors of anime outside the bundle (no graph edges)."""
        content = np.atleast_2d(np.asarray(content, np.float32))
        if not self.graph_dim:
            return content
        return np.hstack([content, np.zeros((len(content), self.graph_dim), np.float32)])

    def _mean(self, vecs: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (w[:, None] * vecs).sum(axis=0) / max(float(w.sum()), 1e-9)

    def favourites_vector(self, liked: list[int], weights: list[float] | None,
                          extra: dict[int, ItemMeta] | None = None) -> np.ndarray:
        """Query vector for a set of liked anime ids (bundle items and/or added anime)."""
        assert self.dropoutnet is not None
        w_all = np.ones(len(liked), np.float32) if not weights else np.asarray(weights, np.float32)
        content, dn_content, psi, cw, pref, pw, warm_idx = [], [], [], [], [], [], []
        zero_psi = None if self.hybrid is None else np.zeros(self.hybrid.psi.shape[1], np.float32)
        for a, wi in zip(liked, w_all):
            if a in self.pos:
                i = self.pos[a]
                content.append(self.content[i]); dn_content.append(self.dn_content[i]); cw.append(wi)
                if self.hybrid is not None:
                    psi.append(self.hybrid.psi[i])
                if self.warm[i]:
                    pref.append(self.wmf.V[i]); pw.append(wi); warm_idx.append(i)
            elif extra and a in extra:
                content.append(extra[a].content); dn_content.append(self.dn_input(extra[a].content)[0])
                cw.append(wi)
                if self.hybrid is not None:
                    t = extra[a].tfidf
                    psi.append(zero_psi if t is None else _unit(np.atleast_2d(t))[0])
        content, cw = np.asarray(content, np.float32), np.asarray(cw, np.float32)
        mean_c = self._mean(np.asarray(dn_content, np.float32), cw)
        mean_v = self._mean(np.asarray(pref), np.asarray(pw, np.float32)) if pref else None
        dn = self.dropoutnet
        uh = dn.user_tower_from(None if mean_v is None else mean_v[None], mean_c[None], transformed=True)
        if self.hybrid is None:
            return dn.serving_user_vectors(uh)[0]
        u = self.wmf.fold_in_one(np.asarray(warm_idx, np.int64), np.asarray(pw, np.float32))[None]
        phi_u = self._mean(_unit(content), cw)[None]
        psi_u = self._mean(np.asarray(psi, np.float32), cw)[None]
        return self.hybrid.serving_user_vectors(uh, u, phi_u, psi_u, self.hybrid.favourites)[0]

    def user_vector(self, user_id: int) -> np.ndarray:
        assert self.dropoutnet is not None
        q = Queries.of_users([self.user_pos[user_id]])
        if self.hybrid is None:
            return self.dropoutnet.serving_user_vectors(self.dropoutnet.user_tower(q))[0]
        return self.hybrid.serving_user_vectors(*self.hybrid.parts(q), self.hybrid.users)[0]

    def whiten(self, raw: np.ndarray) -> np.ndarray:
        return self.whitener.transform(np.atleast_2d(np.asarray(raw, np.float32)))

    def tfidf_vector(self, text: str | None) -> np.ndarray | None:
        """Dense TF-IDF projection of a text with the bundle's fitted vocabulary (None: unknown)."""
        if self.tfidf is None or not text:
            return None
        return self.tfidf.dense(self.tfidf.transform([text]))[0]

    def text_vector(self, raw: np.ndarray, text: str | None = None) -> np.ndarray:
        """Query vector of a content-only user from a raw encoder vector (free-text queries)."""
        assert self.dropoutnet is not None
        dn, c = self.dropoutnet, self.whiten(raw)
        uh = dn.user_tower_from(None, self.dn_input(c), transformed=True)
        if self.hybrid is None:
            return dn.serving_user_vectors(uh)[0]
        u = np.zeros((1, self.wmf.factors), np.float32)
        t = self.tfidf_vector(text)
        psi = np.zeros((1, self.hybrid.psi.shape[1]), np.float32) if t is None else t[None]
        return self.hybrid.serving_user_vectors(uh, u, c, psi, self.hybrid.text)[0]

    def item_vector(self, pref: np.ndarray | None, content: np.ndarray, tfidf: np.ndarray | None = None) -> np.ndarray:
        """Serving vector of one item from its WMF factors (None: cold), whitened content and
        TF-IDF projection (None: that term is left empty)."""
        assert self.dropoutnet is not None
        dn = self.dropoutnet
        v = dn.item_tower(None if pref is None else np.atleast_2d(pref), self.dn_input(content))
        if self.hybrid is None:
            return dn.serving_item_vectors(v, np.array([pref is None]))[0]
        V = np.zeros((1, self.wmf.factors), np.float32) if pref is None else np.atleast_2d(pref)
        return self.hybrid.serving_item_vectors(item_emb=v, V=V, phi=np.atleast_2d(content),
                                                psi=None if tfidf is None else np.atleast_2d(tfidf),
                                                cold=np.array([pref is None]))[0]

    # ---- fallbacks (in memory, bundle items only) -----------------------------------------
    def wmf_scores_favourites(self, liked: list[int], weights: list[float] | None) -> np.ndarray | None:
        idx = [self.pos[a] for a in liked if a in self.pos and self.warm[self.pos[a]]]
        if not idx:
            return None
        w = np.ones(len(idx), np.float32) if not weights else np.asarray(
            [wt for a, wt in zip(liked, weights) if a in self.pos and self.warm[self.pos[a]]], np.float32)
        h = sp.csr_matrix((w, (np.zeros(len(idx), int), idx)), shape=(1, len(self.item_ids)))
        u = self.wmf.fold_in(h)[0]
        return self.wmf.V @ u

    def wmf_scores_user(self, user_id: int) -> np.ndarray | None:
        u = self.wmf.U[self.user_pos[user_id]]
        return None if not np.any(u) else self.wmf.V @ u

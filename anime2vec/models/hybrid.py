"""The served model: each anime scored by what knows it best, on one calibrated scale, as ONE
dot product.

Every anime belongs to one group:
  warm    it has interactions in the training data;
  paired  no interactions, but MAL recommendation pairs link it to warm anime;
  text    nothing but what it has on the day it airs (text, type, year, episodes, genres);
          every anime added through AddAnime starts here.

Components:
  cf       low-rank EASE (models/ease.py): p·q_i, divided by its spread over the catalogue. A
           paired anime's q is the weighted mean of its warm neighbours' q (features/graph.py):
           it borrows their audience.
  content  the bilinear content model (models/bilinear.py): f·c_i with f = z·Wu, c_i = c·Wv,
           divided by the spread of *this query's* content scores (sqrt(fᵀΣf), Σ the item
           covariance): a broad list has flat scores, a narrow one peaked scores, and one offset
           per group must mean the same for both.
  pop      log(1 + training interactions), standardised: a prior, strongest for a query with
           one favourite, so its weight depends on the number of liked anime.
  offset   one constant per group, after each component's group mean is taken out per query
           (p·μ_g, f·μ_g): "how far above the average anime of its group".

    score(q, i) = α_cf·β_cf(g)·(cf − μ_cf,g) + α_ct·β_ct(g)·(content − μ_ct,g) + α_pop(k)·pop + d(g)

α and d depend on the request type (known user, favourites, free text), β on the item's group.
As vectors:
    query [α_cf·p ; α_ct·f ; α_pop(k) ; d(g) − α_cf·β_cf(g)·p·μ_cf,g − α_ct·β_ct(g)·f·μ_ct,g  for each g]
    item  [β_cf(g)·q ; β_ct(g)·c ; pop ; onehot(g)]
so a vector index ranks exactly like `score`. Known users and favourites queries are the same
computation from a history (no fold-in); only the weights differ.

Weights are chosen on the validation split (`tune`), per request type: stage 1 picks α with only
warm anime ranked (its own scenario: warm for known users; favourites with 1, 3, 5, 10 liked, one
popularity weight per list size); stage 2 lets cold anime in and picks the offsets and β that
best predict a user's next interactions whatever group they fall in: the held-out warm positives
together with a sample of their cold positives at the warm holdout's rate (so cold anime weigh
what they would in the user's real future), once as the catalogue is and once with every anime
without interactions brand-new. That is calibration: a score means the same chance of being
watched in every group. Warm and cold anime compete for one list, so the warm-only and cold-only
columns of the report each lose something to the other; an optional tolerance keeps the own
scenario at ≥ (1 − tolerance) of its stage-1 recall (a product floor). A weight that ends on the
edge of its grid is reported as saturated.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..features.graph import neighbour_mean
from .base import Queries, Recommender
from .bilinear import ContentBilinear, _unit_rows
from .ease import EASE

log = logging.getLogger(__name__)

GROUPS = ("warm", "paired", "text")
WARM, PAIRED, TEXT = 0, 1, 2
REQUESTS = ("users", "favourites", "text")
POP_BUCKETS = (1, 3, 6)  # liked-list sizes ≤ 1, ≤ 3, ≤ 6, larger: one prior weight each
_BUCKET_EDGES = np.asarray(POP_BUCKETS)  # searched per query: converted once
GRIDS = {
    # never 0: cold anime are scored through the same content block (times their group's β)
    "content": (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5),
    "pop": (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    "beta": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0),
    "offset": tuple(float(x) for x in np.round(np.arange(-4.0, 4.01, 0.25), 2)),
}
# stage 2's starting offsets for the cold groups. On the full data (validation) the ascent from 0
# ended at a mean objective of 0.5949, from −0.5 at 0.5995, from −1 at 0.6013: it is local
STAGE2_STARTS = (0.0, -0.5, -1.0, -1.5, -2.0)
OUT = -1e4  # an offset that keeps a group out of every list (stage 1)


@dataclass
class Weights:
    """Query-side weights of one request type. pop: one prior weight per liked-list size bucket
    (POP_BUCKETS, then larger lists)."""

    cf: float = 1.0
    content: float = 0.2
    text: float = 0.0  # plain content similarity (free-text queries)
    pop: list[float] = field(default_factory=lambda: [0.0] * (len(POP_BUCKETS) + 1))
    offset: dict[str, float] = field(default_factory=lambda: {g: 0.0 for g in GROUPS})

    def pop_for(self, n_liked: np.ndarray | int) -> np.ndarray:
        return np.asarray(self.pop, np.float32)[_BUCKET_EDGES.searchsorted(n_liked, side="left")]

    def as_dict(self) -> dict:
        return {
            "cf": self.cf,
            "content": self.content,
            "text": self.text,
            "pop": list(self.pop),
            "offset": dict(self.offset),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Weights":
        return cls(
            cf=float(d["cf"]),
            content=float(d["content"]),
            text=float(d.get("text", 0.0)),
            pop=[float(x) for x in d["pop"]],
            offset={g: float(d["offset"][g]) for g in GROUPS},
        )


@dataclass
class ItemSide:
    """Item-side multipliers per group, shared by every request type."""

    beta_cf: dict[str, float] = field(default_factory=lambda: {"warm": 1.0, "paired": 1.0, "text": 0.0})
    beta_content: dict[str, float] = field(default_factory=lambda: {g: 1.0 for g in GROUPS})

    def as_dict(self) -> dict:
        return {"beta_cf": dict(self.beta_cf), "beta_content": dict(self.beta_content)}

    @classmethod
    def from_dict(cls, d: dict) -> "ItemSide":
        return cls(
            beta_cf={g: float(d["beta_cf"][g]) for g in GROUPS},
            beta_content={g: float(d["beta_content"][g]) for g in GROUPS},
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([self.beta_cf[g] for g in GROUPS], np.float32),
            np.array([self.beta_content[g] for g in GROUPS], np.float32),
        )


def content_factors(W: np.ndarray, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """W ≈ Wu Wvᵀ: the bilinear map as two thin matrices (query side, item side)."""
    u, s, vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    r = len(s) if not rank else min(rank, len(s))
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(np.float32), (vt[:r].T * root).astype(np.float32)


class Hybrid(Recommender):
    learns_preferences = True
    # a hybrid served from a bundle (`from_state`) has neither part: it scores from its arrays alone
    cf: EASE | None
    content: ContentBilinear | None
    text_rank: int | None  # from_state: whatever the bundle's params hold

    def __init__(
        self,
        cf: EASE,
        content: ContentBilinear,
        graph: sp.csr_matrix | None = None,
        content_rank: int | None = 128,
        text_rank: int = 128,
        name: str = "anime2vec-hybrid",
    ):
        """cf: a factored EASE (rank set); content: the bilinear content model; graph: MAL
        recommendation-pair adjacency over the items (None: no paired group). Unfitted parts are
        fitted on the same training matrix by `fit`."""
        super().__init__()
        if not cf.rank:
            raise ValueError("the hybrid needs the factored EASE (EASE(rank=...))")
        self.cf, self.content, self.graph, self.name = cf, content, graph, name
        self.content_rank, self.text_rank = content_rank, text_rank
        self.weights = {r: Weights() for r in REQUESTS}
        # free text: what the text says, matched to what each anime's content says (cosine in a
        # projection of the content rows). The bilinear map learnt which content a *list* predicts
        # from co-watching; a description asks for anime like itself.
        self.weights["text"] = Weights(cf=0.0, content=0.0, text=1.0)
        self.items = ItemSide()
        self.tuning: dict = {}

    # ---- parameters ------------------------------------------------------------------------
    def params(self) -> dict:
        return {
            "weights": {r: w.as_dict() for r, w in self.weights.items()},
            "items": self.items.as_dict(),
            "cf": self.cf.params() if self.cf is not None else None,
            "content": self.content.params() if self.content is not None else None,
            "content_rank": self.content_rank,
            "text_rank": self.text_rank,
            "graph": self.graph is not None,
        }

    def set_params(self, params: dict) -> "Hybrid":
        """Weights and calibration from `params()` (or set by hand): no re-tuning."""
        self.weights = {r: Weights.from_dict(params["weights"][r]) for r in REQUESTS}
        self.items = ItemSide.from_dict(params["items"])
        return self

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, train: sp.csr_matrix) -> "Hybrid":
        assert self.cf is not None and self.content is not None, "a hybrid loaded with from_state() cannot be fitted"
        self.train = train.tocsr().astype(np.float32)
        for part in (self.cf, self.content):
            if part.train is None:
                part.fit(self.train)
        self.derive()
        return self

    def derive(self) -> None:
        """Everything scoring needs that follows from the fitted parts (also run when a bundle is
        loaded): groups, the cf vectors of paired anime, the prior, the content factors and the
        per-group statistics."""
        assert self.train is not None and self.cf is not None and self.content is not None, "fit() first"
        assert self.cf.Q is not None and self.content.W is not None and self.text_rank is not None, "fit() first"
        n = self.train.shape[1]
        self.P, self.C = self.cf.P, self.content.content
        warm = np.zeros(n, bool)
        warm[self.cf.warm] = True
        q = self.cf.Q.copy()
        paired = np.zeros(n, bool)
        if self.graph is not None:
            est, weight = neighbour_mean(self.cf.Q, self.graph, warm)
            paired = ~warm & (weight > 0)
            q[paired] = est[paired]
        self.group = np.where(warm, WARM, np.where(paired, PAIRED, TEXT)).astype(np.int8)
        self.Wu, self.Wv = content_factors(self.content.W, self.content_rank)
        # the text block: unit content rows projected on their top singular directions, re-normalised
        unit = _unit_rows(self.C)
        _, _, vt = np.linalg.svd(unit[warm].astype(np.float64), full_matrices=False)
        self.Vt = np.ascontiguousarray(vt[: min(self.text_rank, len(vt))].T, dtype=np.float32)
        self.T = self.text_query(unit)
        self.item_content = (self.content.content @ self.Wv).astype(np.float32)
        counts = np.asarray(self.train.getnnz(axis=0)).ravel().astype(np.float32)
        logc = np.log1p(counts[warm])
        self.pop = np.where(warm, (np.log1p(counts) - logc.mean()) / (logc.std() or 1.0), 0.0).astype(np.float32)
        # cf: one global spread (p·q over a sample of training users and warm anime)
        rng = np.random.default_rng(0)
        users = np.flatnonzero(self.train.getnnz(axis=1))
        sample = rng.choice(users, min(256, len(users)), replace=False)
        p = self.cf.user_factors(self.train[sample])
        w = np.flatnonzero(warm)
        w = rng.choice(w, min(2048, len(w)), replace=False)
        self.cf_scale = float(np.std(p @ q[w].T)) or 1.0
        self.q = (q / self.cf_scale).astype(np.float32)
        self.mu_cf = np.stack([self._mean(self.q, g) for g in range(len(GROUPS))])
        self.mu_content = np.stack([self._mean(self.item_content, g) for g in range(len(GROUPS))])
        self.cov_content = np.cov(self.item_content.T.astype(np.float64)).astype(np.float32)

    STATE = ("P", "q", "C", "group", "pop", "Wu", "Wv", "item_content", "mu_cf", "mu_content", "cov_content", "Vt", "T")

    def state(self) -> dict[str, np.ndarray]:
        """Every array scoring needs (a bundle stores these; `from_state` serves from them)."""
        return {k: np.asarray(getattr(self, k)) for k in self.STATE}

    @classmethod
    def from_state(
        cls, state: dict[str, np.ndarray], params: dict, train: sp.csr_matrix, name: str = "anime2vec-hybrid"
    ) -> "Hybrid":
        """A servable hybrid from `state()` and `params()` (no EASE or bilinear fit needed)."""
        self = cls.__new__(cls)
        Recommender.__init__(self)
        self.name, self.train, self.tuning = name, train.tocsr().astype(np.float32), {}
        self.cf = self.content = self.graph = None
        self.content_rank, self.text_rank = params.get("content_rank"), params.get("text_rank")
        for k in cls.STATE:
            a = np.asarray(state[k])
            setattr(self, k, a.astype(np.int8) if k == "group" else np.ascontiguousarray(a, dtype=np.float32))
        return self.set_params(params)

    def _mean(self, x: np.ndarray, g: int) -> np.ndarray:
        m = self.group == g
        return (x[m].mean(axis=0) if m.any() else np.zeros(x.shape[1])).astype(np.float32)

    # ---- query side ---------------------------------------------------------------------------
    @staticmethod
    def request_type(queries: Queries) -> str:
        return "users" if queries.users is not None else "favourites"

    def query_parts(
        self, history: sp.csr_matrix, extra_content: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, f, t) for confidence rows over the catalogue: the cf query p = x·P, the
        standardised content query and the text-similarity query of z = unit(x·C). extra_content:
        per row, the weighted sum of content rows of liked anime outside the catalogue (added at
        serving time), which only the content side knows."""
        p = np.asarray(history @ self.P, dtype=np.float32)
        z = np.asarray(history @ self.C, dtype=np.float32)
        return self._parts(p, z, extra_content)

    def query_parts_listed(
        self, rows: np.ndarray, weights: np.ndarray, extra_content: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`query_parts` of one history row given as its catalogue rows and confidences, in the
        order the CSR row stores them, without building the matrix (scipy's constructor cost a
        favourites request more than the products): each row's products w·P[i] added in that
        order in float32, as scipy's CSR product adds them, so (p, f, t) are the same bit for
        bit (tests/models/test_hybrid.py)."""
        w = np.asarray(weights, np.float32)[:, None]
        rows = np.asarray(rows, np.int64)
        P, C = np.asarray(self.P), np.asarray(self.C)  # set by fit or from_state
        p = (w * P[rows]).sum(axis=0, keepdims=True)  # axis 0: one row after another
        z = (w * C[rows]).sum(axis=0, keepdims=True)
        return self._parts(p, z, extra_content)

    def _parts(
        self, p: np.ndarray, z: np.ndarray, extra_content: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, f, t) from x·P and x·C (both query_parts paths)."""
        if extra_content is not None:
            z = z + np.atleast_2d(extra_content)
        z = _unit_rows(z)
        return p, self.content_query(z), self.text_query(z)

    def content_query(self, z: np.ndarray) -> np.ndarray:
        """f = z·Wu divided by the spread of its scores over the catalogue (0 stays 0)."""
        f = np.atleast_2d(np.asarray(z, np.float32)) @ self.Wu
        # f·Σ·f per row (a product and a sum: einsum's generic loop cost 6x as much)
        s = np.sqrt(np.maximum(((f @ self.cov_content) * f).sum(axis=1), 0.0))
        return (f / np.where(s > 1e-12, s, 1.0)[:, None]).astype(np.float32)

    def text_query(self, z: np.ndarray) -> np.ndarray:
        """Unit projection of content rows (queries or anime) for the text-similarity block."""
        return _unit_rows(np.atleast_2d(np.asarray(z, np.float32)) @ self.Vt)

    def serving_query_vectors(
        self, p: np.ndarray, f: np.ndarray, t: np.ndarray, request: str, n_liked: np.ndarray | int
    ) -> np.ndarray:
        w = self.weights[request]
        p, f, t = (np.atleast_2d(np.asarray(x, np.float32)) for x in (p, f, t))
        bcf, bct = self.items.arrays()
        off = (
            np.array([w.offset[g] for g in GROUPS], np.float32)
            - w.cf * bcf * (p @ self.mu_cf.T)
            - w.content * bct * (f @ self.mu_content.T)
        )
        pop = np.empty((len(p), 1), np.float32)
        pop[:, 0] = w.pop_for(n_liked)  # one size, or one per row
        blocks = np.concatenate([w.cf * p, w.content * f, pop, off, w.text * t], axis=1)
        return (blocks / self._scales()).astype(np.float32, copy=False)

    def query_vectors(self, queries: Queries) -> np.ndarray:
        h = queries.history_matrix(self.train)
        return self.serving_query_vectors(*self.query_parts(h), self.request_type(queries), h.getnnz(axis=1))

    # ---- item side ----------------------------------------------------------------------------
    def serving_item_vectors(
        self, items: np.ndarray | Sequence[int] | None = None, content: np.ndarray | None = None
    ) -> np.ndarray:
        """Item vectors of catalogue items; of anime outside the catalogue from their content rows
        (`content` alone: an anime added at serving time is in the text group); or of catalogue
        items with new content rows (both: a catalogue anime whose text was replaced keeps its
        audience)."""
        if items is None and content is None:
            raise ValueError("serving_item_vectors needs items, content rows, or both")
        if content is not None:
            content = np.atleast_2d(np.asarray(content, np.float32))
        if items is not None:
            items = np.asarray(items, np.int64)
            q, g, pop = self.q[items], self.group[items], self.pop[items]
            c = self.item_content[items] if content is None else content @ self.Wv
            t = self.T[items] if content is None else self.text_query(_unit_rows(content))
        else:
            assert content is not None  # checked above: items or content
            c, t = content @ self.Wv, self.text_query(_unit_rows(content))
            n = len(c)
            q, g, pop = np.zeros((n, self.q.shape[1]), np.float32), np.full(n, TEXT, np.int8), np.zeros(n, np.float32)
        return (self._raw_items(q, c, pop, g, t) * self._scales()).astype(np.float32)

    def _raw_items(self, q, c, pop, g, t) -> np.ndarray:
        bcf, bct = self.items.arrays()
        onehot = np.eye(len(GROUPS), dtype=np.float32)[g]
        return np.hstack([q * bcf[g][:, None], c * bct[g][:, None], pop[:, None], onehot, t])

    def _scales(self) -> np.ndarray:
        """Per-coordinate factors that bring every block of the catalogue's item vectors to the
        same range (99th percentile of |value| = 1), the query side divided by the same: scores
        are unchanged, but the index's int8 copies (one range for all coordinates, in the
        ranker's opt-in quantized mode) keep every block's precision instead of rounding the
        small-valued ones (the cf factors) to zero: measured, without it quantized search missed
        the top anime entirely."""
        bcf, bct = self.items.arrays()
        key = (bcf.tobytes(), bct.tobytes(), id(self.q))
        if getattr(self, "_scale_key", None) != key:
            raw = self._raw_items(self.q, self.item_content, self.pop, self.group, self.T)
            sizes = [self.q.shape[1], self.item_content.shape[1], 1, len(GROUPS), self.T.shape[1]]
            out, at = [], 0
            for n in sizes:
                top = float(np.quantile(np.abs(raw[:, at : at + n]), 0.99)) if len(raw) else 0.0
                out.append(np.full(n, 1.0 / top if top > 1e-12 else 1.0, np.float32))
                at += n
            self._scale_vec, self._scale_key = np.concatenate(out), key
        return self._scale_vec

    # ---- scoring ------------------------------------------------------------------------------
    def component_scores(self, queries: Queries, items: np.ndarray) -> dict[str, np.ndarray]:
        """Scores per component with the group means taken out, and the prior's weight per query:
        what `combine` weighs (tuning computes these once and re-weights them many times)."""
        items = np.asarray(items, np.int64)
        h = queries.history_matrix(self.train)
        p, f, t = self.query_parts(h)
        g = self.group[items]
        return {
            "cf": p @ self.q[items].T - (p @ self.mu_cf.T)[:, g],
            "content": f @ self.item_content[items].T - (f @ self.mu_content.T)[:, g],
            "text": t @ self.T[items].T,
            "pop": self.pop[items],
            "group": g,
            "n_liked": h.getnnz(axis=1),
        }

    def combine(self, parts: dict, w: Weights) -> np.ndarray:
        bcf, bct = self.items.arrays()
        g = parts["group"]
        off = np.array([w.offset[x] for x in GROUPS], np.float32)[g]
        out = (
            w.cf * parts["cf"] * bcf[g]
            + w.content * parts["content"] * bct[g]
            + w.pop_for(parts["n_liked"])[:, None] * parts["pop"][None, :]
            + off
        )
        if w.text:
            out = out + w.text * parts["text"]
        return out.astype(np.float32)

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        return self.combine(self.component_scores(queries, items), self.weights[self.request_type(queries)])

    def day_one(self, items: np.ndarray) -> "Hybrid":
        """A view in which `items` are brand-new anime: text group, no borrowed audience."""
        view = copy.copy(self)
        moved = np.asarray(items, np.int64)
        moved = moved[self.group[moved] != WARM]
        view.group = self.group.copy()
        view.group[moved] = TEXT
        view.q = self.q.copy()
        view.q[moved] = 0.0
        # the served model's coordinate scales: an anime added at serving time gets exactly these
        view._scale_vec = self._scales()
        view._scale_key = (self._scale_key[0], self._scale_key[1], id(view.q))
        return view

    # ---- selection on validation --------------------------------------------------------------
    def tune(
        self,
        objective: Callable[[Callable[[dict], np.ndarray], str, str], float],
        tolerance: float | None = None,
        passes: int = 2,
        starts: tuple[float, ...] = STAGE2_STARTS,
    ) -> None:
        """Choose the weights on validation (see the module docstring).

        objective(scorer, request, target) → recall@100, where scorer(parts) turns cached
        `component_scores` into blend scores; request "users" / "favourites"; target "own" (the
        request type's scenario; for favourites "own:k" for each list size k), "mix" (a user's
        next interactions whatever their group: held-out warm positives and as many of their
        cold ones as the warm holdout's rate), "mix_new" (the same with every anime without
        interactions brand-new: the day-one view), and for the report "cold" / "new" (cold
        anime alone, in the whole catalogue). tolerance: None picks the offsets and β that
        predict the mix best; a number also keeps the own scenario at ≥ (1 − tolerance) of its
        stage-1 recall (a product floor). starts: stage 2's starting offsets of the cold groups
        (coordinate ascent is local: the best end point is kept)."""
        for request in ("users", "favourites"):
            w = self.weights[request]
            run, own = self._stage1(objective, request, passes)
            stage1 = own()
            log.info("hybrid %s: stage 1 (warm-only blend) %.4f", request, stage1)
            floor = None if tolerance is None else stage1 * (1 - tolerance)
            w.offset = {"warm": 0.0, "paired": 0.0, "text": 0.0}

            def mix() -> float:
                if floor is not None and own() < floor:
                    return -np.inf
                # cold_items ranks cold anime among themselves: blind to warm-vs-cold, it aligns
                # the paired and text groups with each other
                return (run("mix") + run("mix_new") + run("cold_items")) / 3

            # from each start (the cold groups' offsets; β from where they were), keep the best
            items0, ends, best = copy.deepcopy(self.items), {}, None
            for start in starts:
                w.offset = {"warm": 0.0, "paired": start, "text": start}
                slots = [(w.offset, "text", GRIDS["offset"]), (w.offset, "paired", GRIDS["offset"])]
                if request == "users":  # the item side is shared: tuned with known users
                    self.items = copy.deepcopy(items0)
                    slots += [
                        (self.items.beta_content, "text", GRIDS["beta"]),
                        (self.items.beta_content, "paired", GRIDS["beta"]),
                        (self.items.beta_cf, "paired", GRIDS["beta"]),
                    ]
                ends[start] = self._ascend(mix, slots, passes)
                log.info("hybrid %s: stage 2 from offset %g → %.4f", request, start, ends[start])
                if best is None or ends[start] > best[0] + 1e-6:
                    best = (ends[start], dict(w.offset), copy.deepcopy(self.items))
            assert best is not None, "stage 2 needs at least one start"
            w.offset, self.items = best[1], best[2]
            self.tuning[request] = {
                "stage2_starts": {str(k): v for k, v in ends.items()},
                "own_stage1": stage1,
                "tolerance": tolerance,
                "floor": floor,
                "own": own(),
                "mix": run("mix"),
                "mix_new": run("mix_new"),
                "cold_items": run("cold_items"),
                "cold": run("cold"),
                "new": run("new"),
                "weights": w.as_dict(),
                "items": self.items.as_dict(),
                "saturated": self.saturated(request),
            }
            log.info("hybrid %s: %s", request, self.tuning[request])

    def _stage1(self, objective, request: str, passes: int):
        """Stage 1 for one request type: the warm-only blend (cold groups kept out of every list).
        Returns (run(target), own()) bound to that request's weights."""
        w = self.weights[request]
        w.cf, w.offset = 1.0, {"warm": 0.0, "paired": OUT, "text": OUT}

        def run(target: str) -> float:
            return objective(lambda parts: self.combine(parts, w), request, target)

        own_names = ["own"] if request == "users" else [f"own:{k}" for k in (1, 3, 5, 10)]
        own = lambda: float(np.mean([run(t) for t in own_names]))  # noqa: E731
        self._ascend(own, [(w, "content", GRIDS["content"])], passes)
        if request == "favourites":  # one prior weight per list size, each on its own scenario
            for b, t in enumerate(own_names):
                self._ascend(functools.partial(run, t), [(w.pop, b, GRIDS["pop"])], passes)
        else:
            self._ascend(own, [(w.pop, b, GRIDS["pop"]) for b in range(len(w.pop))], passes)
        return run, own

    def tune_warm(self, objective, passes: int = 2) -> dict[str, float]:
        """Stage 1 alone, for both request types: their warm-only validation recall (used to choose
        what the hybrid is built on)."""
        return {request: self._stage1(objective, request, passes)[1]() for request in ("users", "favourites")}

    def saturated(self, request: str) -> list[str]:
        """Weights on the edge of their grid (the grid may be too narrow there)."""
        w = self.weights[request]
        checks = [
            ("content", w.content, GRIDS["content"]),
            *((f"pop[{b}]", v, GRIDS["pop"]) for b, v in enumerate(w.pop)),
            *((f"offset.{g}", w.offset[g], GRIDS["offset"]) for g in ("paired", "text")),
        ]
        checks += [
            (f"{kind}.{g}", v, GRIDS["beta"])
            for kind in ("beta_cf", "beta_content")
            for g, v in getattr(self.items, kind).items()
            if g != "warm" and not (kind == "beta_cf" and g == "text")
        ]
        return [f"{name}={v}" for name, v, grid in checks if v != 0.0 and v in (grid[0], grid[-1])]

    @staticmethod
    def _ascend(objective: Callable[[], float], slots: list, passes: int) -> float:
        """Coordinate ascent over (container, key, grid) slots; ties keep the current value."""
        best = objective()
        for _ in range(passes):
            improved = False
            for box, key, grid in slots:
                keep = box[key] if isinstance(box, (dict, list)) else getattr(box, key)
                for v in grid:
                    if v == keep:
                        continue
                    _set(box, key, float(v))
                    val = objective()
                    if val > best + 1e-6:
                        best, keep, improved = val, float(v), True
                _set(box, key, keep)
            if not improved:
                break
        return best


def _set(box, key, value: float) -> None:
    if isinstance(box, (dict, list)):
        box[key] = value
    else:
        setattr(box, key, value)

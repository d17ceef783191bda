"""DropoutNet (Volkovs, Yu & Poutanen, NeurIPS 2017) over WMF factors and anime2vec content.

Two towers, Û = f_U([U_u ; φ_u]) and V̂ = f_V([V_v ; φ_v]), trained so Û·V̂ reproduces the WMF
score U_u·V_v on each user's top-scored items plus random items (MSE). During training the
preference half of the input is randomly
  - zeroed for items (item dropout: teaches the item tower to work from text alone), and
  - for users, replaced by the mean V of the user's items (transform: favourites-only users) or
    zeroed (user dropout).
At serving time a brand-new anime enters as [0 ; φ_v] and a favourites query as
[transform(mean V of the favourites) ; mean φ of the favourites].

φ_u is the confidence-weighted mean of the user's items' content vectors (DeepAniNet's user
content). Preference inputs and content are standardised with statistics of the training
users/items so the two halves of the input have comparable scale.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .base import Queries, Recommender
from .wmf import WMF

SMALL_BATCH = 16  # rows at or below which inference runs in numpy (Tower.forward_numpy)

log = logging.getLogger(__name__)


@dataclass
class DropoutNetConfig:
    hidden: tuple[int, ...] = (500,)  # tanh + batch-norm layers per tower
    out_dim: int = 200  # rank of Û, V̂
    p_item_dropout: float = 0.5
    p_user_transform: float = 0.3
    p_user_dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-6
    epochs: int = 40
    patience: int = 6  # epochs without validation gain before stopping
    batch_users: int = 256
    top_pool: int = 100  # each user's top-scored WMF items to sample from
    n_top: int = 50
    n_rand: int = 50
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DropoutNetConfig":
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", (500,)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Tower(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.Tanh()]
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        """The eval-mode forward in numpy (float32), for a few rows: torch's per-call overhead is
        most of the cost of a one-row forward. The weights are copied once per change (tensor
        version counters: training and load_state_dict modify them in place)."""
        tensors = [t for m in self.net for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = getattr(self, "_numpy_layers", None)
        if cached is None or cached[0] != key:
            layers: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
            for m in self.net:
                if isinstance(m, nn.Linear):
                    layers.append(("linear", _np(m.weight).T.copy(), _np(m.bias)))
                elif isinstance(m, nn.BatchNorm1d):  # eval mode: running statistics, folded to a*x + b
                    assert m.running_mean is not None and m.running_var is not None  # track_running_stats
                    scale = _np(m.weight) / np.sqrt(_np(m.running_var) + np.float32(m.eps))
                    layers.append(("affine", scale, _np(m.bias) - _np(m.running_mean) * scale))
                elif isinstance(m, nn.Tanh):
                    layers.append(("tanh", None, None))
                else:
                    raise TypeError(f"forward_numpy does not know {type(m).__name__}")
            cached = self._numpy_layers = (key, layers)
        x = np.asarray(x, np.float32)
        for kind, a, b in cached[1]:
            x = x @ a + b if kind == "linear" else x * a + b if kind == "affine" else np.tanh(x)
        return x.astype(np.float32, copy=False)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


@dataclass
class Standardiser:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        x = np.asarray(x, np.float32)
        return cls(x.mean(axis=0), x.std(axis=0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


@dataclass
class _Inputs:
    """Everything the towers read, precomputed once per fit / load."""

    pref_u: Standardiser
    pref_t: Standardiser  # for transformed users (mean V of their items)
    pref_v: Standardiser
    cont_u: Standardiser
    cont_v: Standardiser
    extras: dict = field(default_factory=dict)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def training_step(
    f_u: nn.Module,
    f_v: nn.Module,
    opt: torch.optim.Optimizer,
    c: DropoutNetConfig,
    rng: np.random.Generator,
    ub: np.ndarray,
    top_b: np.ndarray,
    items: np.ndarray,
    U: np.ndarray,
    V: np.ndarray,
    pu: np.ndarray,
    pt: np.ndarray,
    cu: np.ndarray,
    pv: np.ndarray,
    cv: np.ndarray,
    tensor: Callable[[np.ndarray], torch.Tensor],
) -> tuple[float, int]:
    """One optimiser step for the batch of users `ub` (rows of U, pu, pt, cu; top_b: each one's pool
    of top-scored items): candidates are n_top items from the pool plus n_rand random `items`, the
    target is the WMF score, with user transform/dropout and item dropout applied to the preference
    inputs. Returns (loss, distinct items through the item tower). `DropoutNet.fit` and the scale
    benchmark (bench/scale.py) both run this, so the benchmark times the real step."""
    pool = top_b.shape[1]
    tj = top_b[np.arange(len(ub))[:, None], rng.integers(0, pool, (len(ub), c.n_top))]
    rj = items[rng.integers(0, len(items), (len(ub), c.n_rand))]
    cand = np.concatenate([tj, rj], axis=1)  # (B, S)
    target = np.einsum("bf,bsf->bs", U[ub], V[cand])
    uniq, inv = np.unique(cand, return_inverse=True)
    # user preference input: own factors, transform, or dropped
    mode = rng.random(len(ub))
    upref = pu[ub].copy()
    tr = mode < c.p_user_transform
    upref[tr] = pt[ub[tr]]
    upref[(mode >= c.p_user_transform) & (mode < c.p_user_transform + c.p_user_dropout)] = 0.0
    # item dropout per unique item in the batch
    vpref = pv[uniq].copy()
    vpref[rng.random(len(uniq)) < c.p_item_dropout] = 0.0
    uh = f_u(tensor(np.concatenate([upref, cu[ub]], axis=1)))
    vh = f_v(tensor(np.concatenate([vpref, cv[uniq]], axis=1)))
    pred = (uh[:, None, :] * vh[tensor(inv.reshape(cand.shape)).long()]).sum(-1)
    loss = torch.mean((pred - tensor(target)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), len(uniq)


class DropoutNet(Recommender):
    learns_preferences = True

    def __init__(
        self,
        content: np.ndarray,
        wmf: WMF,
        config: DropoutNetConfig | None = None,
        name: str = "dropoutnet",
        device: str | None = None,
    ):
        """content: (n_items, d) item content vectors aligned to item indices (already whitened).
        wmf: fitted or unfitted WMF; `fit` fits it on the same training matrix if needed."""
        super().__init__()
        self.name = name
        self.content = np.ascontiguousarray(content, dtype=np.float32)
        self.wmf = wmf
        self.config = config or DropoutNetConfig()
        self.device = _device(device)
        self.history: list[dict] = []
        self.item_emb: np.ndarray | None = None
        # Additive score offset for items without preference data (V = 0), selected on the
        # validation split by `calibrate`: the text-only tower output is a shrunk estimate and
        # would otherwise lose every whole-catalogue comparison against warm items.
        self.cold_bias: float = 0.0
        self.calibration: list[dict] = []
        # trailing content columns written after release (the recommendation-graph block,
        # features/graph.py): an anime on the day it airs has none, so `day_one` zeroes them
        self.post_release_dims: int = 0

    def params(self) -> dict:
        return {
            "dropoutnet": self.config.to_dict(),
            "wmf": self.wmf.params(),
            "content_dim": int(self.content.shape[1]),
        }

    # ---- inputs -------------------------------------------------------------------------
    def _weighted_mean(self, h: sp.csr_matrix, x: np.ndarray) -> np.ndarray:
        w = np.asarray(h.sum(axis=1)).ravel()
        w[w == 0] = 1.0
        return np.asarray(h @ x, dtype=np.float32) / w[:, None].astype(np.float32)

    def _fit_inputs(self, train: sp.csr_matrix) -> _Inputs:
        U, V = self.wmf.U, self.wmf.V
        assert U is not None and V is not None, "fit the WMF first"
        users = np.flatnonzero(train.getnnz(axis=1))
        items = np.flatnonzero(train.getnnz(axis=0))
        return _Inputs(
            pref_u=Standardiser.fit(U[users]),
            pref_t=Standardiser.fit(self._weighted_mean(train[users], V)),
            pref_v=Standardiser.fit(V[items]),
            cont_u=Standardiser.fit(self._weighted_mean(train[users], self.content)),
            cont_v=Standardiser.fit(self.content[items]),
        )

    def _build(self) -> None:
        r, d, c = self.wmf.factors, self.content.shape[1], self.config
        torch.manual_seed(c.seed)
        self.f_u = Tower(r + d, c.hidden, c.out_dim).to(self.device)
        self.f_v = Tower(r + d, c.hidden, c.out_dim).to(self.device)

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)

    # ---- training -----------------------------------------------------------------------
    def fit(self, train: sp.csr_matrix, validation: Callable[["DropoutNet"], float] | None = None) -> "DropoutNet":
        """Train the towers. `validation(model) -> score` (higher is better) is called after each
        epoch; the best epoch's weights are kept (selection on the validation split)."""
        self.train = train.tocsr().astype(np.float32)
        if self.wmf.U is None:
            self.wmf.fit(self.train)
        c = self.config
        rng = np.random.default_rng(c.seed)
        self.inputs = self._fit_inputs(self.train)
        self._build()
        U, V = self.wmf.U, self.wmf.V
        assert U is not None and V is not None  # fitted above
        users = np.flatnonzero(self.train.getnnz(axis=1))
        items = np.flatnonzero(self.train.getnnz(axis=0))

        # per-user precomputation: inputs and the pool of top-scored items
        pu = self.inputs.pref_u(U)
        pt = self.inputs.pref_t(self._weighted_mean(self.train, V))
        cu = self.inputs.cont_u(self._weighted_mean(self.train, self.content))
        pv = self.inputs.pref_v(V)
        cv = self.inputs.cont_v(self.content)
        pool = min(c.top_pool, len(items))
        top = np.empty((len(users), pool), np.int64)
        for s in range(0, len(users), 1024):
            sc = U[users[s : s + 1024]] @ V[items].T
            top[s : s + 1024] = items[np.argpartition(-sc, pool - 1, axis=1)[:, :pool]]

        params = list(self.f_u.parameters()) + list(self.f_v.parameters())
        opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        best, best_state, stale = -math.inf, None, 0
        self.history = []
        for epoch in range(c.epochs):
            self.f_u.train()
            self.f_v.train()
            order = rng.permutation(len(users))
            total, n = 0.0, 0
            for s in range(0, len(order), c.batch_users):
                b = order[s : s + c.batch_users]
                if len(b) < 2:
                    continue
                loss, _ = training_step(
                    self.f_u, self.f_v, opt, c, rng, users[b], top[b], items, U, V, pu, pt, cu, pv, cv, self._t
                )
                total += loss * len(b)
                n += len(b)
            self._refresh_items()
            rec = {"epoch": epoch + 1, "train_mse": total / max(n, 1)}
            if validation is not None:
                rec["val"] = float(validation(self))
                if rec["val"] > best:
                    best, stale = rec["val"], 0
                    best_state = copy.deepcopy((self.f_u.state_dict(), self.f_v.state_dict(), epoch + 1))
                else:
                    stale += 1
            self.history.append(rec)
            log.info("dropoutnet %s epoch %d %s", self.name, epoch + 1, rec)
            if validation is not None and stale >= c.patience:
                break
        if best_state is not None:
            self.f_u.load_state_dict(best_state[0])
            self.f_v.load_state_dict(best_state[1])
            self.best_epoch = best_state[2]
        else:
            self.best_epoch = len(self.history)
        self._refresh_items()
        return self

    # ---- inference ----------------------------------------------------------------------
    def item_tower(self, pref: np.ndarray | None, content: np.ndarray) -> np.ndarray:
        """V̂ for raw item inputs; pref=None (or rows of zeros) means a cold item (text only)."""
        content = np.atleast_2d(np.asarray(content, np.float32))
        p = np.zeros((len(content), self.wmf.factors), np.float32) if pref is None else self.inputs.pref_v(pref)
        if pref is not None:
            p[~np.any(np.asarray(pref) != 0, axis=1)] = 0.0
        return self._infer(self.f_v, np.concatenate([p, self.inputs.cont_v(content)], axis=1))

    def _infer(self, tower: Tower, x: np.ndarray) -> np.ndarray:
        """Eval-mode forward: a serving request's few rows in numpy (0.05 vs 0.5 ms for one row,
        measured), batches in torch (on the GPU when there is one)."""
        if len(x) <= SMALL_BATCH:
            return tower.forward_numpy(x)
        with torch.inference_mode():
            tower.eval()
            return tower(self._t(x)).cpu().numpy().astype(np.float32)

    def _refresh_items(self) -> None:
        assert self.wmf.V is not None, "fit the WMF first"
        warm = np.any(self.wmf.V != 0, axis=1)
        pref = np.where(warm[:, None], self.wmf.V, 0.0).astype(np.float32)
        self.item_emb = np.concatenate(
            [self.item_tower(pref[s : s + 8192], self.content[s : s + 8192]) for s in range(0, len(pref), 8192)]
        )

    def user_tower(self, queries: Queries) -> np.ndarray:
        """Û for known users (own factors) or favourites queries (transform of the liked items)."""
        assert self.wmf.U is not None and self.wmf.V is not None, "fit() first"
        h = queries.history_matrix(self.train)
        mean_content = self._weighted_mean(h, self.content)
        if queries.users is not None:
            return self.user_tower_from(self.wmf.U[queries.users], mean_content, transformed=False)
        return self.user_tower_from(self._weighted_mean(h, self.wmf.V), mean_content, transformed=True)

    def user_tower_from(
        self, pref: np.ndarray | None, mean_content: np.ndarray, transformed: bool = True
    ) -> np.ndarray:
        """Û from raw inputs: pref is a user's own U (transformed=False) or the mean V of the items
        they like (transformed=True); None or all-zero rows mean content alone (e.g. a free-text
        query, or favourites that are all cold items)."""
        mean_content = np.atleast_2d(np.asarray(mean_content, np.float32))
        if pref is None:
            p = np.zeros((len(mean_content), self.wmf.factors), np.float32)
        else:
            pref = np.atleast_2d(np.asarray(pref, np.float32))
            p = (self.inputs.pref_t if transformed else self.inputs.pref_u)(pref)
            p[~np.any(pref != 0, axis=1)] = 0.0
        return self._infer(self.f_u, np.concatenate([p, self.inputs.cont_u(mean_content)], axis=1))

    def day_one(self, items: np.ndarray) -> "DropoutNet":
        """Cold `items` as brand-new anime: their post-release content columns zeroed."""
        if not self.post_release_dims:
            return self
        items = np.asarray(items, np.int64)
        items = items[self.cold_items[items]]
        assert self.item_emb is not None, "fit() first"
        view = copy.copy(self)
        view.content = self.content.copy()
        view.content[items, -self.post_release_dims :] = 0.0
        view.item_emb = self.item_emb.copy()
        view.item_emb[items] = self.item_tower(None, view.content[items])
        return view

    @property
    def cold_items(self) -> np.ndarray:
        return ~np.any(self.wmf.V != 0, axis=1)

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        assert self.item_emb is not None, "fit() first"
        s = self.user_tower(queries) @ self.item_emb[items].T
        if self.cold_bias:
            s += np.float32(self.cold_bias) * self.cold_items[items][None, :]
        return s

    # Serving form: one dot product. Û gets a constant 1 and V̂ the cold offset as an extra
    # coordinate, so a vector index ranks exactly like `score`.
    def serving_item_vectors(self, item_emb: np.ndarray, cold: np.ndarray) -> np.ndarray:
        extra = (np.float32(self.cold_bias) * np.asarray(cold, np.float32))[:, None]
        return np.hstack([np.atleast_2d(item_emb), extra]).astype(np.float32)

    def serving_user_vectors(self, user_emb: np.ndarray) -> np.ndarray:
        u = np.atleast_2d(user_emb)
        return np.hstack([u, np.ones((len(u), 1), np.float32)]).astype(np.float32)

    def calibrate(
        self,
        validation: Callable[["DropoutNet"], float],
        grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    ) -> float:
        """Pick `cold_bias` (in units of the std of user-item scores) by the validation score."""
        assert self.train is not None, "fit() first"
        rng = np.random.default_rng(self.config.seed)
        users = np.flatnonzero(self.train.getnnz(axis=1))
        sample = self.score(
            Queries.of_users(rng.choice(users, min(256, len(users)), replace=False)),
            rng.choice(self.train.shape[1], min(2048, self.train.shape[1]), replace=False),
        )
        scale = float(np.std(sample)) or 1.0
        self.calibration, best, best_b = [], -math.inf, 0.0
        for g in grid:
            self.cold_bias = g * scale
            v = float(validation(self))
            self.calibration.append({"bias_std": g, "bias": self.cold_bias, "val": v})
            if v > best:
                best, best_b = v, self.cold_bias
        self.cold_bias = best_b
        return best_b

    # ---- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Flat name → array mapping (weights and standardisers) for a bundle."""
        out: dict[str, np.ndarray] = {}
        for tower, mod in (("f_u", self.f_u), ("f_v", self.f_v)):
            for k, v in mod.state_dict().items():
                out[f"{tower}.{k}"] = v.detach().cpu().numpy()
        for name in ("pref_u", "pref_t", "pref_v", "cont_u", "cont_v"):
            st = getattr(self.inputs, name)
            out[f"std.{name}.mean"], out[f"std.{name}.std"] = st.mean, st.std
        out["cold_bias"] = np.asarray([self.cold_bias], np.float32)
        return out

    @classmethod
    def from_state(
        cls,
        state: dict[str, np.ndarray],
        config: DropoutNetConfig,
        content: np.ndarray,
        wmf: WMF,
        name: str = "dropoutnet",
        device: str | None = None,
    ) -> "DropoutNet":
        m = cls(content, wmf, config, name=name, device=device)
        m.train = wmf.train

        def std(n: str) -> Standardiser:
            return Standardiser(state[f"std.{n}.mean"], state[f"std.{n}.std"])

        m.inputs = _Inputs(
            pref_u=std("pref_u"), pref_t=std("pref_t"), pref_v=std("pref_v"), cont_u=std("cont_u"), cont_v=std("cont_v")
        )
        m._build()
        for tower, mod in (("f_u", m.f_u), ("f_v", m.f_v)):
            sd = {
                k[len(tower) + 1 :]: torch.from_numpy(np.asarray(v))
                for k, v in state.items()
                if k.startswith(tower + ".")
            }
            mod.load_state_dict(sd)
        m.cold_bias = float(state["cold_bias"][0]) if "cold_bias" in state else 0.0
        m._refresh_items()
        return m

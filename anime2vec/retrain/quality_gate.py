"""The quality gate: its evaluation queries, scoring a bundle as the ranker serves it, and the comparison rule."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.dataset import Dataset
from ..feedback import FeedbackEvent

if TYPE_CHECKING:
    pass

from .config import FLOOR_METRIC
from .events import FeedbackData


@dataclass
class GateQuery:
    user_id: int | None
    truth: np.ndarray  # anime ids
    exclude: np.ndarray  # anime ids never ranked
    liked: np.ndarray | None = None  # favourites query: liked anime ids (+ weights)
    weights: np.ndarray | None = None
    events: list[FeedbackEvent] | None = None  # a user with feedback: served through serving_model.users.compute_user


@dataclass
class GateScenario:
    name: str
    candidates: np.ndarray  # anime ids, in the seeded tie-break order shared by every bundle
    queries: list[GateQuery]


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def gate_scenarios(
    ds: Dataset, fb: FeedbackData, names: set[str], seed: int = 0, max_queries: int | None = None
) -> list[GateScenario]:
    """The standard protocol's test scenarios named in `names` (evaluation/protocol.py, the same
    queries, truth and exclusions) plus "recent", in anime ids so any bundle can answer them."""
    from ..evaluation.protocol import scenarios

    fav_ks = tuple(sorted(int(n.removeprefix("fav_k")) for n in names if n.startswith("fav_k")))
    out = []
    for sc in scenarios(ds, split="test", fav_ks=fav_ks, seed=seed, max_queries=max_queries):
        if sc.name not in names:
            continue
        queries = []
        for j, u in enumerate(sc.users):
            uid = int(ds.user_ids[u])
            truth = ds.item_ids[sc.truth[j].indices]
            exclude = ds.item_ids[sc.exclude[j].indices] if sc.exclude is not None else np.zeros(0, np.int64)
            if sc.family == "favourites":
                w = None if sc.queries.liked_weights is None else sc.queries.liked_weights[j]
                queries.append(GateQuery(uid, truth, exclude, liked=ds.item_ids[sc.queries.liked[j]], weights=w))
            else:
                evs = fb.train_events.get(uid)
                if evs:  # the ranker never recommends anything on the user's list back
                    exclude = np.setdiff1d(np.union1d(exclude, [int(e.anime_id) for e in evs]), truth)
                queries.append(GateQuery(uid, truth, exclude, events=evs))
        cands = ds.item_ids[_rng(seed, f"gate/{sc.name}").permutation(sc.candidates)]
        out.append(GateScenario(sc.name, cands, queries))
    if "recent" in names and fb.recent:
        queries = [GateQuery(q.user_id, q.truth, np.setdiff1d(q.exclude, q.truth), events=q.events) for q in fb.recent]
        out.append(GateScenario("recent", ds.item_ids[_rng(seed, "gate/recent").permutation(ds.n_items)], queries))
    return out


# ---- scoring as served ------------------------------------------------------------------------------


class ServedScorer:
    """One bundle loaded from disk (checksums verified) into the ranker's `ServingModel`, scoring a
    query the way the ranker answers it: DropoutNet/hybrid query vector · the served item vectors
    (what the Qdrant collection holds; exact search), else the WMF fallback, else popularity.
    Favourites → ServingModel.favourites_vector; a user with feedback → serving_model.users.compute_user
    (the fold-in the ranker stores for them); a training user → ServingModel.user_vector."""

    def __init__(self, path: Path):
        from ..bundle import load_bundle
        from ..serving_model import users
        from ..serving_model.model import ServingModel

        self.model = ServingModel(load_bundle(Path(path)))
        self._compute_user, self._wmf_online = users.compute_user, users.wmf_scores
        self.version = self.model.version
        self.pos = self.model.pos
        self.served_by: dict[str, int] = {}

    def scores(self, q: GateQuery) -> np.ndarray | None:
        """Scores over the bundle's items (model.item_ids order); None: the ranker cannot answer."""
        m = self.model
        vec, wmf = None, None
        if q.liked is not None:
            keep = [j for j, a in enumerate(q.liked) if int(a) in m.pos]
            if not keep:
                return None
            liked = [int(q.liked[j]) for j in keep]
            w = None if q.weights is None else [float(q.weights[j]) for j in keep]
            vec = m.favourites_vector(liked, w) if m.has_dropoutnet else None
            wmf = lambda: m.wmf_scores_favourites(liked, w)  # noqa: E731
        elif q.events:
            user = self._compute_user(m, {}, int(q.user_id), q.events)  # no added anime offline
            vec = user.vector
            wmf = lambda: self._wmf_online(m, user.listed)  # noqa: E731
        elif q.user_id in m.user_pos:
            vec = m.user_vector(int(q.user_id)) if m.has_dropoutnet else None
            wmf = lambda: m.wmf_scores_user(int(q.user_id))  # noqa: E731
        else:
            return None
        if vec is not None:
            return self._served("dropoutnet", m.item_tower @ vec)
        s = wmf()
        return self._served("wmf", s) if s is not None else self._served("popularity", m.popularity)

    def _served(self, by: str, s: np.ndarray) -> np.ndarray:
        self.served_by[by] = self.served_by.get(by, 0) + 1
        return s


class PopularityScorer:
    """The ranker's last fallback (MAL members, then training counts) of one bundle: the floor."""

    def __init__(self, scorer: ServedScorer):
        self.model, self.pos, self.version = scorer.model, scorer.pos, "popularity"

    def scores(self, q: GateQuery) -> np.ndarray:
        return self.model.popularity


def evaluate_scorer(scorer, scenarios: list[GateScenario], ks: tuple[int, ...] = (20, 100)) -> dict[str, np.ndarray]:
    """ "<scenario>/recall@K" → per-query recall (hits in the top K / truth size)."""
    out: dict[str, np.ndarray] = {}
    max_k = max(ks)
    for sc in scenarios:
        col = np.array([scorer.pos.get(int(a), -1) for a in sc.candidates], np.int64)
        have = col >= 0
        at = {int(a): j for j, a in enumerate(sc.candidates)}
        rec = {k: np.zeros(len(sc.queries)) for k in ks}
        for j, q in enumerate(sc.queries):
            s_items = scorer.scores(q)
            if s_items is None:
                continue  # recall 0: the ranker would answer NOT_FOUND
            s = np.full(len(sc.candidates), -np.inf, np.float64)
            s[have] = s_items[col[have]]
            ex = [at[int(a)] for a in q.exclude if int(a) in at]
            s[ex] = -np.inf
            top = np.argsort(-s, kind="stable")[:max_k]
            top = top[np.isfinite(s[top])]
            hits = np.isin(sc.candidates[top], q.truth)
            for k in ks:
                rec[k][j] = hits[:k].sum() / len(q.truth)
        for k in ks:
            out[f"{sc.name}/recall@{k}"] = rec[k]
    return out


def training_leak(scorer: ServedScorer, scenarios: list[GateScenario]) -> float:
    """Fraction of truth (user, anime) pairs that are in the bundle's training matrix: 0 when the
    evaluation data is unseen; above 0 the comparison flatters that bundle (logged, not gated)."""
    m, n, leaked = scorer.model, 0, 0
    for sc in scenarios:
        for q in sc.queries:
            n += len(q.truth)
            u = m.user_pos.get(int(q.user_id)) if q.user_id is not None else None
            if u is None:
                continue
            row = m.train[u]
            seen = set(m.item_ids[row.indices].tolist())
            leaked += sum(int(a) in seen for a in q.truth)
    return leaked / n if n else 0.0


# ---- the gate -------------------------------------------------------------------------------------------


@dataclass
class Check:
    metric: str
    current: float | None
    candidate: float
    n: int
    drop: float | None = None  # current - candidate (positive: worse)
    relative_drop: float | None = None
    se: float | None = None  # standard error of the paired per-query difference
    allowed: float | None = None  # max(tolerance x current, noise_z x se)
    regressed: bool = False


def compare(metric: str, cur: np.ndarray | None, cand: np.ndarray, tolerance: float, noise_z: float) -> Check:
    c = Check(metric, None if cur is None else float(cur.mean()), float(cand.mean()), len(cand))
    if cur is None or len(cand) == 0:
        return c
    diff = cand - cur
    c.drop = float(-diff.mean())
    c.relative_drop = c.drop / c.current if c.current > 0 else None  # from 0 nothing can regress
    c.se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    c.allowed = max(tolerance * c.current, noise_z * c.se)
    c.regressed = c.drop > c.allowed
    return c


def gate(
    current: dict[str, np.ndarray] | None,
    candidate: dict[str, np.ndarray],
    popularity: dict[str, np.ndarray],
    metrics: tuple[str, ...],
    tolerance: float,
    noise_z: float,
) -> tuple[bool, list[Check], list[str]]:
    """(passed, checks, reasons). With a current version: no gate metric may regress (`compare`).
    Without one (first bundle, or the current cannot be loaded): the absolute floor, beating the
    ranker's popularity fallback on warm users. Metrics whose scenario has no query are skipped
    with a note."""
    checks, reasons, passed = [], [], True
    floor = FLOOR_METRIC
    if current is None and (floor not in candidate or len(candidate[floor]) == 0):
        passed = False
        reasons.append(f"floor: {floor} has no query, so the candidate cannot be checked against popularity")
    elif current is None:
        cand, pop = float(candidate[floor].mean()), float(popularity[floor].mean())
        if not cand > pop:
            passed = False
            reasons.append(f"floor: {floor} {cand:.4f} does not beat the popularity fallback ({pop:.4f})")
    for name in metrics:
        if name not in candidate or len(candidate[name]) == 0:
            reasons.append(f"{name}: no query in this evaluation; not gated")
            continue
        c = compare(name, None if current is None else current.get(name), candidate[name], tolerance, noise_z)
        checks.append(c)
        if c.regressed:
            passed = False
            reasons.append(
                f"{name}: {c.current:.4f} → {c.candidate:.4f} ({-100 * c.relative_drop:+.1f}%, "
                f"allowed −{c.allowed:.4f} = max({100 * tolerance:g}% of current, "
                f"{noise_z:g} SE {c.se:.4f}))"
            )
    if passed:
        reasons.append(
            "no gate metric regressed beyond the tolerance"
            if current is not None
            else f"no current version: the candidate beats the popularity fallback on {floor}"
        )
    return passed, checks, reasons

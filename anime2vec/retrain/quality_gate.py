"""The quality gate: its evaluation scenarios, the bundles scored as the ranker serves them
(`serving_model.recommender.ServedRecommender`, run by the `evaluation.protocol.Experiment` like
every other model), and the comparison rule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import load_bundle
from ..data.dataset import Dataset
from ..evaluation.protocol import Experiment, Scenario, index_rows, minus, scenarios, seeded_rng
from ..feedback import FeedbackEvent
from ..models.base import Queries
from ..serving_model.model import ServingModel
from ..serving_model.recommender import ServedPopularity, ServedRecommender
from .config import FLOOR_METRIC
from .events import FeedbackData

GATE_KS = (20, 100)


@dataclass
class GateEvaluation:
    """The gate's scenarios in one evaluation space: the dataset's items, and its users followed by
    the feedback users it does not hold (a recent-events query of a user with no positive yet).
    `events`: each feedback user's training events, which the ranker folds in for them."""

    data: Dataset
    scenarios: list[Scenario]
    user_ids: np.ndarray
    events: dict[int, list[FeedbackEvent]]
    seed: int = 0

    def served(self, path: Path, name: str) -> ServedRecommender:
        """A bundle from disk (checksums verified), answering as the ranker does."""
        model = ServingModel(load_bundle(Path(path)))
        return ServedRecommender(model, self.data.item_ids, self.user_ids, self.data.train, self.events, name=name)

    def popularity(self, served: ServedRecommender) -> ServedPopularity:
        """That bundle's popularity fallback: the floor."""
        m = served.model
        return ServedPopularity(m, self.data.item_ids, self.user_ids, self.data.train, self.events, name="popularity")

    def recall(self, model: ServedRecommender) -> dict[str, np.ndarray]:
        """ "<scenario>/recall@K" → per-query recall (hits in the top K / truth size), in query order."""
        res = Experiment(self.data, [model], split="test", ks=GATE_KS, seed=self.seed, scenarios=self.scenarios).run(
            progress=False
        )
        return {
            f"{sc.name}/recall@{k}": res.per_query[(model.name, sc.name)][f"recall@{k}"]
            for sc in self.scenarios
            for k in GATE_KS
        }


def gate_scenarios(
    ds: Dataset, fb: FeedbackData, names: set[str], seed: int = 0, max_queries: int | None = None
) -> GateEvaluation:
    """The standard protocol's test scenarios named in `names` (evaluation/protocol.py, the same
    queries, truth and exclusions; a feedback user's listed anime excluded too, as the ranker never
    recommends them back) plus "recent" (feedback users' most recent events held out). Candidates
    in one seeded order per scenario, the same for every bundle, so exact ties break alike."""
    fav_ks = tuple(sorted(int(n.removeprefix("fav_k")) for n in names if n.startswith("fav_k")))
    item_pos = ds.item_index()
    out = []
    for sc in scenarios(ds, split="test", fav_ks=fav_ks, seed=seed, max_queries=max_queries):
        if sc.name not in names:
            continue
        exclude = sc.exclude
        if sc.family != "favourites":
            extra = [
                np.array(
                    [
                        item_pos[int(e.anime_id)]
                        for e in fb.train_events.get(int(ds.user_ids[u]), ())
                        if int(e.anime_id) in item_pos
                    ],
                    np.int64,
                )
                for u in sc.users
            ]
            listed = index_rows(extra, ds.n_items)
            exclude = minus(listed if exclude is None else exclude + listed, sc.truth)  # truth is never excluded
        cands = seeded_rng(seed, f"gate/{sc.name}").permutation(sc.candidates)
        out.append(dataclasses.replace(sc, exclude=exclude, candidates=cands, shuffle=False))
    user_ids = np.asarray(ds.user_ids, np.int64)
    if "recent" in names and fb.recent:
        user_pos = {int(u): i for i, u in enumerate(user_ids)}
        outside = [q.user_id for q in fb.recent if q.user_id not in user_pos]
        user_ids = np.r_[user_ids, np.asarray(outside, np.int64)]
        user_pos.update({u: len(ds.user_ids) + j for j, u in enumerate(outside)})
        truth = [np.array([item_pos[int(a)] for a in q.truth], np.int64) for q in fb.recent]
        exclude = [
            np.array([item_pos[int(a)] for a in np.setdiff1d(q.exclude, q.truth) if int(a) in item_pos], np.int64)
            for q in fb.recent
        ]
        users = np.array([user_pos[q.user_id] for q in fb.recent], np.int64)
        out.append(
            Scenario(
                name="recent",
                queries=Queries.of_users(users),
                candidates=seeded_rng(seed, "gate/recent").permutation(ds.n_items),
                truth=index_rows(truth, ds.n_items),
                exclude=index_rows(exclude, ds.n_items),
                split="test",
                family="warm",
                users=users,
                shuffle=False,
                about="feedback users' most recent events held out, their earlier events known; whole catalogue",
            )
        )
    return GateEvaluation(ds, out, user_ids, dict(fb.train_events), seed)


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
    current = float(cur.mean())
    diff = cand - cur
    c.drop = drop = float(-diff.mean())
    c.relative_drop = drop / current if current > 0 else None  # from 0 nothing can regress
    c.se = se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    c.allowed = allowed = max(tolerance * current, noise_z * se)
    c.regressed = drop > allowed
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
            assert c.current is not None and c.relative_drop is not None and c.allowed is not None  # regressed
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

"""Retraining behind a quality gate: base data + feedback events → candidate bundle → the gate
compares it with the served version on the same evaluation data, scored through the serving code
→ promote (alias move) or keep, every decision logged and exported as metrics.

    events (the feedback store: PostgreSQL in one REPEATABLE READ snapshot, or an SQLite file's backup)
      → validated (bad / unknown anime skipped and counted), capped per user
      → per user, the most recently received events held out (the recent-events holdout)
      → the rest folded per user by `user_confidences` (the training rules) and added to the base
        data's split dataset (`extend_dataset`, through `pipeline.prepare(extend_dataset=...)`)
      → the standard pipeline trains and exports a candidate bundle
      → gate: current (alias target, else the newest other bundle) and candidate are loaded from disk
        into `ServingModel`s and score the same queries as the ranker would answer them; promote
        with `Rollout.build` + `Rollout.promote` only if no gate metric regresses beyond the
        tolerance (with no current version: only if the candidate beats the ranker's popularity
        fallback on warm users).

Splits stay those of the base data (same seed, same item universe), so the current and the
candidate are evaluated on data neither was trained on, as long as the current version was trained
from the same base data and seed (every retrain and the train Job are); each decision logs the share
of the evaluation truth either side was trained on (`training_leak`, 0 when sound). Feedback interactions are routed the way
`build_dataset` routes base interactions: a pair the base data already places keeps its place
(training or an evaluation split) with the new confidence, or leaves it when the events make it a
non-positive; a new pair of a training (or new) user goes to training on a training item, to the
cold validation/test truth on a validation/test item; held-out (favourites) users' pairs go to
their held-out row. New user ids become training users.

Gate rule for each gate metric ("<scenario>/recall@K"): the candidate regresses when it is worse
than the current version by more than `tolerance` x the current value (relative) AND by more than
`noise_z` standard errors of the paired per-query difference (both answer the same queries), so
a nightly retrain is not refused for evaluation noise on a small scenario, and a real loss on a
large one is never excused by it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data.dataset import Dataset
from .feedback import FeedbackEvent, FeedbackStore, user_confidences, validate_event

if TYPE_CHECKING:
    from .pipeline import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_GATE_METRICS = ("warm/recall@100", "fav_k5/recall@100", "cold_whole/recall@100", "recent/recall@100")
FLOOR_METRIC = "warm/recall@100"        # must beat the popularity fallback (the ranker's last resort)
DECISIONS = ("promoted", "refused", "dry_run", "failed")
DECISION_LOG = "retrain-decisions.jsonl"
LOCK_FILE = ".retrain.lock"
PUSH_JOB = "anime2vec-retrain"
RETRAIN_MODELS = ("popularity", "wmf", "anime2vec-hybrid")
SKIP_REASONS = ("invalid", "unknown_anime", "anime_without_text", "over_user_cap")
_MATRICES = ("train", "warm_val", "warm_test", "cold_val", "cold_test", "heldout")


class RetrainError(RuntimeError):
    """Retraining cannot start (missing feedback store, unknown candidate, another run holds the lock)."""


@dataclass
class RetrainConfig:
    train: TrainConfig                              # its store is the bundle store the rankers read
    events: tuple[Path, ...]                        # SQLite: the ranker's feedback.sqlite (unused with events_dsn)
    events_dsn: str | None = None                   # PostgreSQL: the store of record every replica writes
    ranker_data_dir: Path | None = None             # embedded index under <dir>/qdrant (when no qdrant_url)
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    tolerance: float = 0.02                         # relative: of the current value
    noise_z: float = 2.0                            # 0: no noise allowance
    gate_metrics: tuple[str, ...] = DEFAULT_GATE_METRICS
    holdout_frac: float = 0.2
    holdout_min_events: int = 5
    max_events_per_user: int = 10_000
    gate_queries: int | None = None                 # per standard scenario (None: every test query)
    dry_run: bool = False
    candidate: str | None = None                    # gate this existing bundle instead of training one
    metrics_file: Path | None = None
    pushgateway: str | None = None
    report_dir: Path | None = None

    @property
    def store(self) -> Path:
        return Path(self.train.store)


# ---- events ----------------------------------------------------------------------------------


def read_events(path: Path) -> pd.DataFrame:
    """Every event of the feedback store at `path` (FeedbackStore.all_events columns), read from a
    consistent snapshot: the live database is opened read-only (`mode=ro`, never written, no
    tables created) and copied with SQLite's online backup, which reads it in one transaction
    while the ranker keeps writing (WAL: readers never block the writer)."""
    path = Path(path)
    if not path.is_file():
        raise RetrainError(f"no feedback store at {path}")
    with tempfile.TemporaryDirectory(prefix="a2v-retrain-") as tmp:
        snapshot = Path(tmp) / "feedback.sqlite"
        src = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(snapshot)
            try:
                src.backup(dst)
            finally:
                dst.close()
        except sqlite3.DatabaseError as e:
            raise RetrainError(f"cannot read the feedback store {path}: {e}") from e
        finally:
            src.close()
        store = FeedbackStore(snapshot)
        try:
            return store.all_events()
        finally:
            store.close()


def read_events_postgres(dsn: str) -> pd.DataFrame:
    """Every event of the PostgreSQL store of record that all ranker replicas write, in arrival
    order, read in one REPEATABLE READ, READ ONLY transaction: a consistent snapshot while the
    replicas keep writing (anime2vec/store/feedback_postgres.py). Migrates nothing it does not own:
    the schema is the rankers' (opening applies missing migrations, as a ranker would)."""
    from .store.feedback_postgres import PostgresFeedbackStore
    from .store.postgres import Database, DatabaseUnavailable

    try:
        db = Database(dsn, max_connections=1, application_name="anime2vec-retrain")
    except DatabaseUnavailable as e:
        raise RetrainError(f"cannot read the feedback store: {e.message}") from e
    try:
        return PostgresFeedbackStore(db).all_events()
    finally:
        db.close()


def read_feedback(cfg: "RetrainConfig") -> pd.DataFrame:
    """The events retraining learns from: the PostgreSQL store when configured, else the SQLite file(s)."""
    if cfg.events_dsn:
        return read_events_postgres(cfg.events_dsn)
    return read_all_events(cfg.events)


@dataclass
class RecentQuery:
    """One user of the recent-events holdout: what they did before (training events), what they
    did last (truth: new positives), what is never ranked (everything they had listed)."""
    user_id: int
    events: list[FeedbackEvent]          # training events (the held-out ones removed)
    truth: np.ndarray                    # anime ids
    exclude: np.ndarray                  # anime ids


def read_all_events(paths) -> pd.DataFrame:
    """The events of SQLite feedback stores (normally one: replicas share PostgreSQL instead;
    several only to merge old per-ranker files): concatenated in arrival order; an event id stored
    in two counts once, as first received."""
    frames = [read_events(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if len(frames) == 1:
        return frames[0]
    df = pd.concat(frames, ignore_index=True).sort_values("received_at", kind="stable")
    return df.drop_duplicates("event_id", keep="first").reset_index(drop=True)


@dataclass
class FeedbackData:
    interactions: pd.DataFrame           # user_id, anime_id, confidence: every anime a user's training events name (0: not positive / removed)
    train_events: dict[int, list[FeedbackEvent]]
    recent: list[RecentQuery]
    counts: dict[str, int]
    fingerprint: str
    last_received_at: float | None

    def describe(self) -> dict:
        return {"counts": self.counts, "fingerprint": self.fingerprint, "last_received_at": self.last_received_at,
                "users": len(self.train_events), "recent_queries": len(self.recent)}


def _to_events(df: pd.DataFrame) -> list[FeedbackEvent]:
    return [FeedbackEvent(str(r.event_id), int(r.user_id), int(r.anime_id), str(r.kind),
                          None if pd.isna(r.score) else int(r.score),
                          None if pd.isna(r.occurred_at) else float(r.occurred_at), float(r.received_at))
            for r in df.itertuples(index=False)]


def _fold(user_id: int, events: list[FeedbackEvent]) -> list[tuple[int, int, float]]:
    """(user, anime, confidence) for every anime the events name; removed ones get 0."""
    conf = user_confidences(events)
    return [(user_id, a, float(conf.get(a, 0.0))) for a in sorted({int(e.anime_id) for e in events})]


def prepare_feedback(events: pd.DataFrame, catalog: pd.DataFrame, item_ids: np.ndarray,
                     base_interactions: pd.DataFrame, holdout_frac: float = 0.2, holdout_min_events: int = 5,
                     max_events_per_user: int = 10_000) -> FeedbackData:
    """Validate and cap the events, cut the recent-events holdout, fold the rest per user.

    Skipped (counted by reason, never fatal): events that fail `validate_event` ("invalid"), name
    an anime the catalogue does not have ("unknown_anime") or one without text, outside the model's
    item universe ("anime_without_text"), and a user's oldest events beyond `max_events_per_user`
    ("over_user_cap"). Holdout: each user with at least `holdout_min_events` valid events has their
    last max(1, floor(frac * n)) events by arrival held out; its truth is the anime those events
    make positive that the user had not listed before (base data or training events)."""
    counts = {"events": int(len(events)), **{f"skipped_{r}": 0 for r in SKIP_REASONS}}
    events = events.reset_index(drop=True)
    evs = _to_events(events)
    ok = np.array([validate_event(e) is None for e in evs], bool)
    counts["skipped_invalid"] = int((~ok).sum())
    in_catalogue = events["anime_id"].isin(catalog.index).to_numpy()
    in_universe = events["anime_id"].isin(item_ids).to_numpy()
    counts["skipped_unknown_anime"] = int((ok & ~in_catalogue).sum())
    counts["skipped_anime_without_text"] = int((ok & in_catalogue & ~in_universe).sum())
    keep = ok & in_universe
    valid = events[keep].copy()
    valid["_order"] = np.flatnonzero(keep)
    valid = valid.sort_values(["user_id", "received_at", "_order"], kind="stable")
    # newest first within a user, so the cap keeps a user's most recent events
    rank_from_end = valid.groupby("user_id").cumcount(ascending=False).to_numpy()
    counts["skipped_over_user_cap"] = int((rank_from_end >= max_events_per_user).sum())
    valid = valid[rank_from_end < max_events_per_user]

    users = valid["user_id"].unique()
    base = base_interactions[base_interactions["user_id"].isin(users)]
    known = {int(u): set(g.to_numpy().tolist()) for u, g in base.groupby("user_id")["anime_id"]}
    liked_before = set(base.loc[base["positive"], "user_id"].to_numpy().tolist())
    rows: list[tuple[int, int, float]] = []
    train_events: dict[int, list[FeedbackEvent]] = {}
    recent: list[RecentQuery] = []
    n_heldout = 0
    for uid, g in valid.groupby("user_id", sort=True):
        uid = int(uid)
        user_events = _to_events(g)
        n_out = max(1, int(holdout_frac * len(user_events))) if (
            holdout_frac > 0 and len(user_events) >= holdout_min_events) else 0
        train, held = user_events[:len(user_events) - n_out], user_events[len(user_events) - n_out:]
        n_heldout += len(held)
        if train:
            train_events[uid] = train
            rows += _fold(uid, train)
        if held and train:
            listed = known.get(uid, set()) | {int(e.anime_id) for e in train}
            after = user_confidences(user_events)
            truth = sorted({int(e.anime_id) for e in held} - listed)
            truth = [a for a in truth if after.get(a, 0.0) > 0]
            # a query needs something to fold in: a positive before the holdout
            if truth and (uid in liked_before or any(c > 0 for c in user_confidences(train).values())):
                recent.append(RecentQuery(uid, train, np.asarray(truth, np.int64),
                                          np.asarray(sorted(listed), np.int64)))
    counts.update(used=int(len(valid)), heldout=n_heldout, users=int(len(users)))
    interactions = pd.DataFrame(rows, columns=["user_id", "anime_id", "confidence"]).astype(
        {"user_id": np.int64, "anime_id": np.int64, "confidence": np.float32})
    digest = hashlib.sha256(pd.util.hash_pandas_object(
        events[["event_id", "user_id", "anime_id", "kind", "score", "occurred_at", "received_at"]],
        index=False).to_numpy().tobytes()).hexdigest()
    last = float(events["received_at"].max()) if len(events) else None
    return FeedbackData(interactions, train_events, recent, counts, digest, last)


# ---- the dataset hook ----------------------------------------------------------------------------


def extend_dataset(ds: Dataset, interactions: pd.DataFrame) -> Dataset:
    """`ds` plus feedback interactions (user_id, anime_id, confidence; 0 removes a pair), routed by
    the base split (module docstring). Items, item splits and existing users' roles are unchanged;
    new users with a positive join the training users."""
    item_pos = pd.Series(np.arange(ds.n_items), index=ds.item_ids)
    ev = interactions[interactions["anime_id"].isin(item_pos.index)]
    ev = pd.DataFrame({"user_id": ev["user_id"].to_numpy(np.int64),
                       "item": item_pos.loc[ev["anime_id"].to_numpy()].to_numpy(np.int64),
                       "conf": ev["confidence"].to_numpy(np.float32)})
    parts = []
    for where, name in enumerate(_MATRICES):
        m = getattr(ds, name).tocoo()
        parts.append(pd.DataFrame({"user_id": ds.user_ids[m.row], "item": m.col.astype(np.int64),
                                   "conf": m.data.astype(np.float32), "where": np.int8(where)}))
    base = pd.concat(parts, ignore_index=True)
    ev = ev.merge(base[["user_id", "item", "where"]], on=["user_id", "item"], how="left")

    # routing of pairs the base data does not place: by the user's and the item's role
    item_role = np.full(ds.n_items, -1, np.int8)
    item_role[ds.train_items], item_role[ds.val_items], item_role[ds.test_items] = 0, 1, 2
    heldout_users = set(ds.user_ids[np.concatenate([ds.val_users, ds.test_users])].tolist())
    new = ev["where"].isna().to_numpy()
    role = item_role[ev["item"].to_numpy()]
    is_heldout_user = ev["user_id"].isin(heldout_users).to_numpy()
    to = np.where(is_heldout_user, np.where(role == 0, 5, -1),
                  np.select([role == 1, role == 2], [3, 4], default=0))
    ev["where"] = np.where(new, to, ev["where"].fillna(-1)).astype(np.int8)
    touched = pd.MultiIndex.from_frame(ev[["user_id", "item"]])
    kept = base[~pd.MultiIndex.from_frame(base[["user_id", "item"]]).isin(touched)]
    added = ev[(ev["conf"] > 0) & (ev["where"] >= 0)]
    entries = pd.concat([kept, added[["user_id", "item", "conf", "where"]]], ignore_index=True)

    user_ids = np.union1d(ds.user_ids, added["user_id"].to_numpy(np.int64))
    remap = np.searchsorted(user_ids, ds.user_ids)
    new_users = np.setdiff1d(user_ids, ds.user_ids)
    rows = np.searchsorted(user_ids, entries["user_id"].to_numpy())
    shape = (len(user_ids), ds.n_items)

    def matrix(where: int) -> sp.csr_matrix:
        sel = entries["where"].to_numpy() == where
        m = sp.csr_matrix((entries["conf"].to_numpy(np.float32)[sel], (rows[sel], entries["item"].to_numpy()[sel])),
                          shape=shape, dtype=np.float32)
        m.sum_duplicates()
        m.sort_indices()
        return m

    mats = {name: matrix(where) for where, name in enumerate(_MATRICES)}
    train_users = np.sort(np.concatenate([remap[ds.train_users], np.searchsorted(user_ids, new_users)]))
    routed = {name: int((added["where"] == where).sum()) for where, name in enumerate(_MATRICES)}
    params = {**ds.params, "feedback": {"pairs": int(len(ev)), "added_or_updated": routed,
                                        "removed": int(((ev["conf"] <= 0) & ~new).sum()),
                                        "new_users": int(len(new_users))}}
    return Dataset(item_ids=ds.item_ids, user_ids=user_ids, train_items=ds.train_items, val_items=ds.val_items,
                   test_items=ds.test_items, train_users=train_users, val_users=np.sort(remap[ds.val_users]),
                   test_users=np.sort(remap[ds.test_users]), seed=ds.seed, params=params, **mats)


# ---- the gate's evaluation data -------------------------------------------------------------------


@dataclass
class GateQuery:
    user_id: int | None
    truth: np.ndarray                    # anime ids
    exclude: np.ndarray                  # anime ids never ranked
    liked: np.ndarray | None = None      # favourites query: liked anime ids (+ weights)
    weights: np.ndarray | None = None
    events: list[FeedbackEvent] | None = None   # a user with feedback: served through serving_model.users.compute_user


@dataclass
class GateScenario:
    name: str
    candidates: np.ndarray               # anime ids, in the seeded tie-break order shared by every bundle
    queries: list[GateQuery]


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def gate_scenarios(ds: Dataset, fb: FeedbackData, names: set[str], seed: int = 0,
                   max_queries: int | None = None) -> list[GateScenario]:
    """The standard protocol's test scenarios named in `names` (evaluation/protocol.py, the same
    queries, truth and exclusions) plus "recent", in anime ids so any bundle can answer them."""
    from .evaluation.protocol import scenarios

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
                if evs:   # the ranker never recommends anything on the user's list back
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
        from .bundle import load_bundle
        from .serving_model import users
        from .serving_model.model import ServingModel

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
            user = self._compute_user(m, {}, int(q.user_id), q.events)   # no added anime offline
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
    """"<scenario>/recall@K" → per-query recall (hits in the top K / truth size)."""
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
                continue   # recall 0: the ranker would answer NOT_FOUND
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
    drop: float | None = None            # current - candidate (positive: worse)
    relative_drop: float | None = None
    se: float | None = None              # standard error of the paired per-query difference
    allowed: float | None = None         # max(tolerance x current, noise_z x se)
    regressed: bool = False


def compare(metric: str, cur: np.ndarray | None, cand: np.ndarray, tolerance: float, noise_z: float) -> Check:
    c = Check(metric, None if cur is None else float(cur.mean()), float(cand.mean()), len(cand))
    if cur is None or len(cand) == 0:
        return c
    diff = cand - cur
    c.drop = float(-diff.mean())
    c.relative_drop = c.drop / c.current if c.current > 0 else None   # from 0 nothing can regress
    c.se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    c.allowed = max(tolerance * c.current, noise_z * c.se)
    c.regressed = c.drop > c.allowed
    return c


def gate(current: dict[str, np.ndarray] | None, candidate: dict[str, np.ndarray], popularity: dict[str, np.ndarray],
         metrics: tuple[str, ...], tolerance: float, noise_z: float) -> tuple[bool, list[Check], list[str]]:
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
            reasons.append(f"{name}: {c.current:.4f} → {c.candidate:.4f} ({-100 * c.relative_drop:+.1f}%, "
                           f"allowed −{c.allowed:.4f} = max({100 * tolerance:g}% of current, "
                           f"{noise_z:g} SE {c.se:.4f}))")
    if passed:
        reasons.append("no gate metric regressed beyond the tolerance" if current is not None else
                       f"no current version: the candidate beats the popularity fallback on {floor}")
    return passed, checks, reasons


# ---- training ---------------------------------------------------------------------------------------------


def train_candidate(cfg: TrainConfig, fb: FeedbackData, report_dir: Path | None = None) -> tuple[Path, Dataset]:
    """Train and export a candidate on the base data plus the feedback interactions, with the
    standard pipeline (selection on validation, the standard protocol on test into the manifest)."""
    from .pipeline import SERVING_MODEL, evaluate, export_bundle, fit_models, prepare

    cfg = dataclasses.replace(cfg, models=tuple(dict.fromkeys((*cfg.models, "wmf", SERVING_MODEL))))
    p = prepare(cfg, extend_dataset=lambda ds: extend_dataset(ds, fb.interactions))
    # the bundle's data fingerprint covers the events it learnt from
    fp = hashlib.sha256(f"{p.data.fingerprint}:{fb.fingerprint}".encode()).hexdigest()
    p.data = dataclasses.replace(p.data, fingerprint=fp, source=f"{p.data.source}+feedback",
                                 files={**p.data.files, "feedback.sqlite (events)": fb.fingerprint})
    models, selection = fit_models(p)
    results = evaluate(p, models, split="test")
    selection["retrain"] = fb.describe()
    if report_dir is not None:
        from .evaluation.report import write_report

        write_report(results, report_dir, title="anime2vec retrain candidate", command="anime2vec retrain",
                     dataset_description={**p.ds.describe(), "data_source": p.data.source})
    return export_bundle(p, models, selection, results), p.ds


def base_dataset(cfg: TrainConfig):
    """(MalData, the base split dataset) exactly as `pipeline.prepare` builds them."""
    from .data.dataset import build_dataset
    from .data.loader import load_mal

    data = load_mal(cfg.data_dir, sample=cfg.sample)
    return data, build_dataset(data.catalog, data.interactions, seed=cfg.seed, split=cfg.split)


# ---- decisions, log, metrics ----------------------------------------------------------------------------


@dataclass
class Decision:
    decision: str                        # promoted | refused | dry_run | failed
    current: str | None
    candidate: str | None
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)          # role -> metric -> mean
    checks: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def record(self) -> dict:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp)),
                "timestamp": round(self.timestamp, 3), **{k: v for k, v in dataclasses.asdict(self).items()
                                                          if k != "timestamp"}}


def append_decision(store: Path, decision: Decision) -> Path:
    """One JSON line per decision, appended and fsynced (the log is the history the metrics derive from)."""
    path = Path(store) / DECISION_LOG
    line = json.dumps(decision.record(), sort_keys=True, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def read_decisions(store: Path) -> list[dict]:
    path = Path(store) / DECISION_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping an unreadable line of %s", path)
    return out


def create_retrain_metrics(registry=None):
    """Every metric the retraining job exports (its own registry: a batch job, not a service),
    with unit and help. Returns (registry, metrics by short name)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge

    r = registry if registry is not None else CollectorRegistry()
    return r, {
        "decisions": Counter(
            "a2v_retrain_decisions_total", "Retraining decisions in the decision log, by decision: promoted, "
            "refused (the gate kept the current version), dry_run, failed (unit: decisions).", ["decision"], registry=r),
        "last_decision": Gauge(
            "a2v_retrain_last_decision_timestamp_seconds", "When the latest decision of each kind was taken "
            "(unix time).", ["decision"], unit="seconds", registry=r),
        "consecutive_refusals": Gauge(
            "a2v_retrain_consecutive_refusals", "Refused candidates since the last promotion (unit: decisions).",
            registry=r),
        "gate_metric": Gauge(
            "a2v_retrain_gate_metric", "Gate metrics of the latest decision, measured through the serving code "
            "on the same evaluation data; role is current, candidate or popularity (dimensionless).",
            ["role", "version", "metric"], registry=r),
        "events": Gauge(
            "a2v_retrain_events", "Feedback events seen by the latest run, by outcome: used, heldout (recent-events "
            "holdout) or skipped_<reason> (unit: events).", ["outcome"], registry=r),
    }


def export_metrics(store: Path, decision: Decision, metrics_file: Path | None = None,
                   pushgateway: str | None = None) -> tuple:
    """Metrics from the whole decision log (so every write or push is a complete, consistent
    snapshot whichever run produced it), written as a node-exporter textfile and/or pushed."""
    from prometheus_client import push_to_gateway, write_to_textfile

    registry, m = create_retrain_metrics()
    history = read_decisions(store)
    for d in DECISIONS:
        m["decisions"].labels(decision=d)   # every series exists, at 0 until it happens
    refusals = 0
    for rec in history:
        d = rec.get("decision")
        if d not in DECISIONS:
            continue
        m["decisions"].labels(decision=d).inc()
        m["last_decision"].labels(decision=d).set(float(rec.get("timestamp") or 0))
        refusals = 0 if d == "promoted" else refusals + (d == "refused")
    m["consecutive_refusals"].set(refusals)
    for role, values in decision.metrics.items():
        version = {"current": decision.current, "candidate": decision.candidate}.get(role) or role
        for name, value in values.items():
            if value is not None:
                m["gate_metric"].labels(role=role, version=version, metric=name).set(value)
    for outcome, n in (decision.details.get("events") or {}).items():
        if outcome in ("used", "heldout") or outcome.startswith("skipped_"):
            m["events"].labels(outcome=outcome).set(n)
    if metrics_file is not None:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(metrics_file), registry)
    if pushgateway:
        try:
            push_to_gateway(pushgateway, job=PUSH_JOB, registry=registry, timeout=10)
        except OSError as e:   # the decision stands; monitoring sees it at the next push
            log.error("could not push retrain metrics to %s: %s", pushgateway, e)
    return registry, m


@contextlib.contextmanager
def _exclusive(store: Path) -> Iterator[None]:
    """One retraining at a time per store (the CronJob forbids overlap; this covers runs by hand)."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainError(f"another retrain holds {store / LOCK_FILE}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _current_version(rollout, exclude: str | None) -> str | None:
    """What the rankers serve: the alias target, else (no alias yet) the newest bundle, as the
    ranker's `pick_bundles` chooses."""
    from .bundle import list_bundles

    target = rollout.index.alias_target()
    if target:
        return target
    others = [p.name for p in list_bundles(rollout.store) if p.name != exclude]
    return others[-1] if others else None


def run(cfg: RetrainConfig) -> Decision:
    """Train (or take `cfg.candidate`), gate, promote unless refused or dry-run; log the decision
    and export metrics. A failure after the start is logged as decision "failed" and re-raised."""
    from .rollout import open_rollout

    store = cfg.store
    with _exclusive(store):
        decision = Decision("failed", None, cfg.candidate)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            events = read_feedback(cfg)
            data, ds = base_dataset(cfg.train)
            fb = prepare_feedback(events, data.catalog, ds.item_ids, data.interactions, cfg.holdout_frac,
                                  cfg.holdout_min_events, cfg.max_events_per_user)
            decision.details["events"] = fb.counts
            log.info("feedback: %s; recent-events holdout: %d users", fb.counts, len(fb.recent))
            timings["events"] = time.perf_counter() - t0
            if cfg.candidate:
                path = store / cfg.candidate
                if not path.is_dir():
                    raise RetrainError(f"no bundle {cfg.candidate} in {store}")
                ds = extend_dataset(ds, fb.interactions)
            else:
                path, ds = train_candidate(cfg.train, fb, cfg.report_dir)
                timings["train"] = time.perf_counter() - t0 - timings["events"]
            decision.candidate = path.name
            rollout = open_rollout(store, cfg.ranker_data_dir, cfg.qdrant_url, cfg.qdrant_api_key)
            try:
                decision.current = _current_version(rollout, exclude=path.name)
                t1 = time.perf_counter()
                _gate_and_promote(cfg, decision, ds, fb, path, rollout)
                timings["gate"] = time.perf_counter() - t1
            finally:
                rollout.close()
        except Exception as e:
            decision.decision, decision.passed = "failed", None
            decision.reasons.append(f"{type(e).__name__}: {e}")
            raise
        finally:
            decision.details["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
            decision.timestamp = time.time()
            append_decision(store, decision)
            export_metrics(store, decision, cfg.metrics_file, cfg.pushgateway)
            log.info("retrain decision: %s (current %s, candidate %s): %s", decision.decision, decision.current,
                     decision.candidate, "; ".join(decision.reasons))
    return decision


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Gate scoring is one query at a time, like serving: single-row math for which torch and BLAS
    thread pools are pure overhead (5x slower on a busy 2-core machine). Restored afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def _gate_and_promote(cfg: RetrainConfig, decision: Decision, ds: Dataset, fb: FeedbackData, path: Path,
                      rollout) -> None:
    with _one_thread():
        _gate(cfg, decision, ds, fb, path, rollout)
    if decision.passed and not cfg.dry_run:
        built, n = rollout.build(path.name)
        old, new = rollout.promote(path.name)
        decision.decision = "promoted"
        decision.details["promotion"] = {"from": old, "to": new, "collection_built": built, "points": n}


def _gate(cfg: RetrainConfig, decision: Decision, ds: Dataset, fb: FeedbackData, path: Path, rollout) -> None:
    names = {m.split("/")[0] for m in (*cfg.gate_metrics, FLOOR_METRIC)}
    scs = gate_scenarios(ds, fb, names, seed=ds.seed, max_queries=cfg.gate_queries)
    decision.details["queries"] = {sc.name: len(sc.queries) for sc in scs}
    candidate = ServedScorer(path)
    per_query = {"candidate": evaluate_scorer(candidate, scs),
                 "popularity": evaluate_scorer(PopularityScorer(candidate), scs)}
    served_by = {"candidate": candidate.served_by}
    leak = {"candidate": training_leak(candidate, scs)}
    current = None
    if decision.current:
        try:
            current = ServedScorer(rollout.store / decision.current)
        except Exception as e:   # what the rankers cannot load either: gate on the floor alone
            decision.reasons.append(f"current version {decision.current} cannot be loaded ({e}); "
                                    "gated on the popularity floor only")
        if current is not None:
            per_query["current"] = evaluate_scorer(current, scs)
            served_by["current"] = current.served_by
            leak["current"] = training_leak(current, scs)
    passed, checks, reasons = gate(per_query.get("current"), per_query["candidate"], per_query["popularity"],
                                   cfg.gate_metrics, cfg.tolerance, cfg.noise_z)
    decision.passed = passed
    decision.reasons += reasons
    decision.checks = [dataclasses.asdict(c) for c in checks]
    decision.metrics = {role: {k: float(v.mean()) if len(v) else None for k, v in values.items()}
                        for role, values in per_query.items()}
    decision.details.update(served_by=served_by, training_leak=leak,
                            gate={"tolerance": cfg.tolerance, "noise_z": cfg.noise_z,
                                  "metrics": list(cfg.gate_metrics), "floor": FLOOR_METRIC})
    if cfg.dry_run:
        decision.decision = "dry_run"
        decision.reasons.append("dry run: " + ("would promote" if passed else "would keep the current version"))
    elif not passed:
        decision.decision = "refused"

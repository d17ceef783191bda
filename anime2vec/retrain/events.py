"""Feedback events read from the store of record, validated, capped, held out and folded per user."""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..feedback import FeedbackEvent, FeedbackStore, user_confidences, validate_event
from .config import SKIP_REASONS, RetrainConfig, RetrainError


def read_events(path: str | Path) -> pd.DataFrame:
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
    from ..store.feedback_postgres import PostgresFeedbackStore
    from ..store.postgres import Database, DatabaseUnavailable

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
    events: list[FeedbackEvent]  # training events (the held-out ones removed)
    truth: np.ndarray  # anime ids
    exclude: np.ndarray  # anime ids


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
    interactions: (
        pd.DataFrame
    )  # user_id, anime_id, confidence: every anime a user's training events name (0: not positive / removed)
    train_events: dict[int, list[FeedbackEvent]]
    recent: list[RecentQuery]
    counts: dict[str, int]
    fingerprint: str
    last_received_at: float | None

    def describe(self) -> dict:
        return {
            "counts": self.counts,
            "fingerprint": self.fingerprint,
            "last_received_at": self.last_received_at,
            "users": len(self.train_events),
            "recent_queries": len(self.recent),
        }


def _to_events(df: pd.DataFrame) -> list[FeedbackEvent]:
    return [
        FeedbackEvent(
            str(r.event_id),
            int(r.user_id),
            int(r.anime_id),
            str(r.kind),
            None if pd.isna(r.score) else int(r.score),
            None if pd.isna(r.occurred_at) else float(r.occurred_at),
            float(r.received_at),
        )
        for r in df.itertuples(index=False)
    ]


def _fold(user_id: int, events: list[FeedbackEvent]) -> list[tuple[int, int, float]]:
    """(user, anime, confidence) for every anime the events name; removed ones get 0."""
    conf = user_confidences(events)
    return [(user_id, a, float(conf.get(a, 0.0))) for a in sorted({int(e.anime_id) for e in events})]


def prepare_feedback(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    item_ids: np.ndarray,
    base_interactions: pd.DataFrame,
    holdout_frac: float = 0.2,
    holdout_min_events: int = 5,
    max_events_per_user: int = 10_000,
) -> FeedbackData:
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
        n_out = (
            max(1, int(holdout_frac * len(user_events)))
            if (holdout_frac > 0 and len(user_events) >= holdout_min_events)
            else 0
        )
        train, held = user_events[: len(user_events) - n_out], user_events[len(user_events) - n_out :]
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
                recent.append(
                    RecentQuery(uid, train, np.asarray(truth, np.int64), np.asarray(sorted(listed), np.int64))
                )
    counts.update(used=int(len(valid)), heldout=n_heldout, users=int(len(users)))
    interactions = pd.DataFrame(rows, columns=["user_id", "anime_id", "confidence"]).astype(
        {"user_id": np.int64, "anime_id": np.int64, "confidence": np.float32}
    )
    digest = hashlib.sha256(
        pd.util.hash_pandas_object(
            events[["event_id", "user_id", "anime_id", "kind", "score", "occurred_at", "received_at"]], index=False
        )
        .to_numpy()
        .tobytes()
    ).hexdigest()
    last = float(events["received_at"].max()) if len(events) else None
    return FeedbackData(interactions, train_events, recent, counts, digest, last)

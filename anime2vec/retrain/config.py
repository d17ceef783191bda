"""Retraining's settings, constants and error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..pipeline import TrainConfig


DEFAULT_GATE_METRICS = ("warm/recall@100", "fav_k5/recall@100", "cold_whole/recall@100", "recent/recall@100")
FLOOR_METRIC = "warm/recall@100"  # must beat the popularity fallback (the ranker's last resort)
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
    train: TrainConfig  # its store is the bundle store the rankers read
    events: tuple[Path, ...]  # SQLite: the ranker's feedback.sqlite (unused with events_dsn)
    events_dsn: str | None = None  # PostgreSQL: the store of record every replica writes
    ranker_data_dir: Path | None = None  # embedded index under <dir>/qdrant (when no qdrant_url)
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    tolerance: float = 0.02  # relative: of the current value
    noise_z: float = 2.0  # 0: no noise allowance
    gate_metrics: tuple[str, ...] = DEFAULT_GATE_METRICS
    holdout_frac: float = 0.2
    holdout_min_events: int = 5
    max_events_per_user: int = 10_000
    gate_queries: int | None = None  # per standard scenario (None: every test query)
    dry_run: bool = False
    candidate: str | None = None  # gate this existing bundle instead of training one
    metrics_file: Path | None = None
    pushgateway: str | None = None
    report_dir: Path | None = None

    @property
    def store(self) -> Path:
        return Path(self.train.store)

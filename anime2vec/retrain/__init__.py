"""Retraining behind a quality gate (events.py → dataset_hook.py → train.py → quality_gate.py → decisions.py,
run by job.py): base data + feedback events → candidate bundle → the gate
compares it with the served version on the same evaluation data, scored through the serving code
→ promote (alias move) or keep, every decision logged and exported as metrics.

    events (the feedback store: PostgreSQL in one REPEATABLE READ snapshot, or an SQLite file's backup)
      → validated (bad / unknown anime skipped and counted), capped per user
      → per user, the most recently received events held out (the recent-events holdout)
      → the rest folded per user by `user_confidences` (the training rules) and added to the base
        data's split dataset (`extend_dataset`, through `pipeline.prepare(extend_dataset=...)`)
      → the standard pipeline trains and exports a candidate bundle
      → gate: current (alias target, else the newest other bundle) and candidate are loaded from disk
        as `ServedRecommender`s (serving_model/recommender.py) and score the same queries as the
        ranker would answer them, run by the evaluation's `Experiment` like every model; promote
        with `Rollout.build` + `Rollout.promote` only if no gate metric regresses beyond the
        tolerance (with no current version: only if the candidate beats the ranker's popularity
        fallback on warm users).

Splits stay those of the base data (same seed, same item universe), so the current and the
candidate are evaluated on data neither was trained on, as long as the current version was trained
from the same base data and seed (every retrain and the train Job are); each decision logs the share
of the evaluation truth either side was trained on (`serving_model.recommender.training_leak`, 0 when sound). Feedback interactions are routed the way
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

# The package's public names, as when this was one module (the CLI and the tests import them from here).
from .config import (
    DECISION_LOG,
    DECISIONS,
    DEFAULT_GATE_METRICS,
    FLOOR_METRIC,
    LOCK_FILE,
    PUSH_JOB,
    RETRAIN_MODELS,
    SKIP_REASONS,
    RetrainConfig,
    RetrainError,
)
from .dataset_hook import extend_dataset
from .decisions import Decision, append_decision, create_retrain_metrics, export_metrics, read_decisions
from .events import (
    FeedbackData,
    RecentQuery,
    prepare_feedback,
    read_all_events,
    read_events,
    read_events_postgres,
    read_feedback,
)
from .job import run
from .quality_gate import Check, GateEvaluation, compare, gate, gate_scenarios
from .train import base_dataset, train_candidate

__all__ = [
    "append_decision",
    "base_dataset",
    "Check",
    "compare",
    "create_retrain_metrics",
    "Decision",
    "DECISION_LOG",
    "DECISIONS",
    "DEFAULT_GATE_METRICS",
    "export_metrics",
    "extend_dataset",
    "FeedbackData",
    "FLOOR_METRIC",
    "gate",
    "gate_scenarios",
    "GateEvaluation",
    "LOCK_FILE",
    "prepare_feedback",
    "PUSH_JOB",
    "read_all_events",
    "read_decisions",
    "read_events",
    "read_events_postgres",
    "read_feedback",
    "RecentQuery",
    "RETRAIN_MODELS",
    "RetrainConfig",
    "RetrainError",
    "run",
    "SKIP_REASONS",
    "train_candidate",
]

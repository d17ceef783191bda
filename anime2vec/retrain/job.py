"""One retraining run: lock, train (or take a candidate), gate, promote or keep, log."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from ..data.dataset import Dataset
from ..serving_model.recommender import training_leak
from .config import FLOOR_METRIC, LOCK_FILE, RetrainConfig, RetrainError
from .dataset_hook import extend_dataset
from .decisions import Decision, append_decision, export_metrics
from .events import FeedbackData, prepare_feedback, read_feedback
from .quality_gate import gate, gate_scenarios
from .train import base_dataset, train_candidate

log = logging.getLogger(__name__)


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
    from ..bundle import list_bundles

    target = rollout.index.alias_target()
    if target:
        return target
    others = [p.name for p in list_bundles(rollout.store) if p.name != exclude]
    return others[-1] if others else None


def run(cfg: RetrainConfig) -> Decision:
    """Train (or take `cfg.candidate`), gate, promote unless refused or dry-run; log the decision
    and export metrics. A failure after the start is logged as decision "failed" and re-raised."""
    from ..rollout import open_rollout

    store = cfg.store
    with _exclusive(store):
        decision = Decision("failed", None, cfg.candidate)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            events = read_feedback(cfg)
            data, ds = base_dataset(cfg.train)
            fb = prepare_feedback(
                events,
                data.catalog,
                ds.item_ids,
                data.interactions,
                cfg.holdout_frac,
                cfg.holdout_min_events,
                cfg.max_events_per_user,
            )
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
            log.info(
                "retrain decision: %s (current %s, candidate %s): %s",
                decision.decision,
                decision.current,
                decision.candidate,
                "; ".join(decision.reasons),
            )
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


def _gate_and_promote(
    cfg: RetrainConfig, decision: Decision, ds: Dataset, fb: FeedbackData, path: Path, rollout
) -> None:
    with _one_thread():
        _gate(cfg, decision, ds, fb, path, rollout)
    if decision.passed and not cfg.dry_run:
        built, n = rollout.build(path.name)
        old, new = rollout.promote(path.name)
        decision.decision = "promoted"
        decision.details["promotion"] = {"from": old, "to": new, "collection_built": built, "points": n}


def _gate(cfg: RetrainConfig, decision: Decision, ds: Dataset, fb: FeedbackData, path: Path, rollout) -> None:
    names = {m.split("/")[0] for m in (*cfg.gate_metrics, FLOOR_METRIC)}
    ev = gate_scenarios(ds, fb, names, seed=ds.seed, max_queries=cfg.gate_queries)
    decision.details["queries"] = {sc.name: len(sc.users) for sc in ev.scenarios}
    candidate = ev.served(path, "candidate")
    per_query = {"candidate": ev.recall(candidate), "popularity": ev.recall(ev.popularity(candidate))}
    served_by = {"candidate": candidate.served_by}
    leak = {"candidate": training_leak(candidate, ev.scenarios)}
    current = None
    if decision.current:
        try:
            current = ev.served(rollout.store / decision.current, "current")
        except Exception as e:  # what the rankers cannot load either: gate on the floor alone
            decision.reasons.append(
                f"current version {decision.current} cannot be loaded ({e}); gated on the popularity floor only"
            )
        if current is not None:
            per_query["current"] = ev.recall(current)
            served_by["current"] = current.served_by
            leak["current"] = training_leak(current, ev.scenarios)
    passed, checks, reasons = gate(
        per_query.get("current"),
        per_query["candidate"],
        per_query["popularity"],
        cfg.gate_metrics,
        cfg.tolerance,
        cfg.noise_z,
    )
    decision.passed = passed
    decision.reasons += reasons
    decision.checks = [dataclasses.asdict(c) for c in checks]
    decision.metrics = {
        role: {k: float(v.mean()) if len(v) else None for k, v in values.items()} for role, values in per_query.items()
    }
    decision.details.update(
        served_by=served_by,
        training_leak=leak,
        gate={
            "tolerance": cfg.tolerance,
            "noise_z": cfg.noise_z,
            "metrics": list(cfg.gate_metrics),
            "floor": FLOOR_METRIC,
        },
    )
    if cfg.dry_run:
        decision.decision = "dry_run"
        decision.reasons.append("dry run: " + ("would promote" if passed else "would keep the current version"))
    elif not passed:
        decision.decision = "refused"

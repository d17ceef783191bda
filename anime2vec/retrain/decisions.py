"""Decisions: the JSONL log and the metrics exported after each one (textfile, Pushgateway)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DECISION_LOG, DECISIONS, PUSH_JOB

log = logging.getLogger(__name__)


@dataclass
class Decision:
    decision: str  # promoted | refused | dry_run | failed
    current: str | None
    candidate: str | None
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # role -> metric -> mean
    checks: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def record(self) -> dict:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp)),
            "timestamp": round(self.timestamp, 3),
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "timestamp"},
        }


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
            "a2v_retrain_decisions_total",
            "Retraining decisions in the decision log, by decision: promoted, "
            "refused (the gate kept the current version), dry_run, failed (unit: decisions).",
            ["decision"],
            registry=r,
        ),
        "last_decision": Gauge(
            "a2v_retrain_last_decision_timestamp_seconds",
            "When the latest decision of each kind was taken (unix time).",
            ["decision"],
            unit="seconds",
            registry=r,
        ),
        "consecutive_refusals": Gauge(
            "a2v_retrain_consecutive_refusals",
            "Refused candidates since the last promotion (unit: decisions).",
            registry=r,
        ),
        "gate_metric": Gauge(
            "a2v_retrain_gate_metric",
            "Gate metrics of the latest decision, measured through the serving code "
            "on the same evaluation data; role is current, candidate or popularity (dimensionless).",
            ["role", "version", "metric"],
            registry=r,
        ),
        "events": Gauge(
            "a2v_retrain_events",
            "Feedback events seen by the latest run, by outcome: used, heldout (recent-events "
            "holdout) or skipped_<reason> (unit: events).",
            ["outcome"],
            registry=r,
        ),
    }


def export_metrics(
    store: Path, decision: Decision, metrics_file: Path | None = None, pushgateway: str | None = None
) -> tuple:
    """Metrics from the whole decision log (so every write or push is a complete, consistent
    snapshot whichever run produced it), written as a node-exporter textfile and/or pushed."""
    from prometheus_client import push_to_gateway, write_to_textfile

    registry, m = create_retrain_metrics()
    history = read_decisions(store)
    for name in DECISIONS:
        m["decisions"].labels(decision=name)  # every series exists, at 0 until it happens
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
        except OSError as e:  # the decision stands; monitoring sees it at the next push
            log.error("could not push retrain metrics to %s: %s", pushgateway, e)
    return registry, m

"""Prometheus rules (promtool check + unit tests), the Grafana dashboard's structure, and that every
metric they query is one the services really export.

Metric names are checked against two sources: the encoder's real /metrics, scraped from a
`python -m services.encoder.server` subprocess (A2V_ENCODER_MODEL=tiny-random, free ports) after one
Encode call, for every a2v_rpc_* and a2v_encoder_* series; and, for the ranker/gateway-only metrics
(fallbacks, Qdrant latency, offline metrics), the text exposition of
`anime2vec.serving.metrics.create_metrics()` after one observation of each metric; and, for the
retrain job's a2v_retrain_* metrics (a batch job: pushed to a Pushgateway, no live service exports
them), the exposition `anime2vec.retrain.export_metrics` writes after one decision.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client import generate_latest

from anime2vec.paths import REPO_ROOT
from anime2vec.serving.metrics import create_metrics, set_model_info
from tests.encoder.test_encoder_process import _env, _launch, _wait_for

PROM = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "anime2vec.json"
# a2v_* names that are not recording-rule names (those contain ':').
METRIC = re.compile(r"(?<![\w:])a2v_[a-z0-9_]+(?![\w:])")
RECORDED = re.compile(r"(?<![\w:])[a-z_0-9]+:[a-z0-9_:]+(?![\w:])")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make promtool` installs it (apt package `prometheus`)")
    return subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def test_rules_are_valid():
    proc = _promtool("check", "rules", "rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_pass():
    proc = _promtool("test", "rules", "rules_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]


def test_every_alert_has_a_unit_test():
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]
    tested = {t["alertname"] for group in tests for t in group.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts - {"A2VServiceDown", "A2VLatencySLOSlowBurn"} <= tested, alerts - tested


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_grafana_json():
    d = _dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = [p for p in panels if p["type"] != "row"]
    assert len(queries) >= 15
    for p in queries:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_dashboard_covers_every_concern_and_uses_only_recorded_series():
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))
    recorded_by_rules = {r["record"] for r in _rules() if "record" in r}
    used = set(RECORDED.findall(exprs))
    assert used <= recorded_by_rules, f"dashboard reads series no rule records: {used - recorded_by_rules}"
    for concern in (
        "service:a2v_rpc_errors:ratio_rate5m",
        "service:a2v_rpc_latency_slow:ratio_rate1h",
        "service:a2v_fallbacks:ratio_rate5m",
        "a2v_encoder_queue_depth",
        "instance:a2v_encoder_queue_wait_seconds:p95_5m",
        "a2v:ranker_model_versions:count",
        'up{job="qdrant"}',
        "a2v_qdrant_query_seconds_bucket",
        "a2v_memory_search_seconds_bucket",
        "a2v_model_info",
        "store:a2v_store_write_seconds:p99_5m",
        "a2v_store_errors_total",
        "a2v_store_up",
        "a2v_store_connections",
        "a2v_added_anime_revision",
        "cnpg_pg_replication_lag",
    ):
        assert concern in exprs, f"no dashboard panel shows {concern}"


def _exposed_names(text: str) -> set[str]:
    return {
        re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.fixture(scope="module")
def encoder_exposition() -> str:
    """/metrics of a real encoder process after one Encode call."""
    from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc

    proc, lines = _launch(_env(A2V_ENCODER_MODEL="tiny-random"))
    try:
        started = _wait_for(lines, "serving")
        with grpc.insecure_channel(f"127.0.0.1:{started['grpc_port']}") as channel:
            encoder_pb2_grpc.EncoderServiceStub(channel).Encode(
                encoder_pb2.EncodeRequest(texts=["A boy becomes a ninja."]), timeout=60
            )
        url = f"http://127.0.0.1:{started['metrics_port']}/metrics"
        return urllib.request.urlopen(url, timeout=30).read().decode()
    finally:
        proc.kill()
        proc.wait(30)


def _library_exposition() -> str:
    """Every metric of create_metrics() with one observation, as the ranker and gateway would expose it."""
    m = create_metrics()
    m.rpc_requests.labels(service="ranker", method="m", code="OK").inc()
    m.rpc_latency.labels(service="ranker", method="m").observe(0.01)
    m.rpc_in_flight.labels(service="ranker", method="m").set(0)
    m.fallbacks.labels(service="ranker", reason="r").inc()
    set_model_info(m, "ranker", "v1", "minilm", 384, {"cold/recall@20": 0.1})
    m.encoder_batch_size.observe(1)
    m.encoder_queue_wait.observe(0.001)
    m.encoder_queue_depth.set(0)
    m.qdrant_query.labels(operation="search").observe(0.001)
    m.search_batch_size.observe(1)
    m.bundle_load_failures.labels(service="ranker", reason="invalid").inc()
    m.store_operation.labels(backend="postgres", store="feedback", operation="record").observe(0.003)
    m.store_errors.labels(backend="postgres", store="feedback", operation="record", kind="unavailable").inc()
    m.store_up.labels(backend="postgres").set(1)
    m.store_connections.labels(state="idle").set(1)
    m.added_anime_revision.set(1)
    m.catalog_follow.set(1)
    return generate_latest(m.registry).decode()


def retrain_exposition(store) -> str:
    """What the retrain job writes and pushes after one logged decision (store: an empty directory)."""
    from anime2vec.retrain import Decision, append_decision, export_metrics

    d = Decision(
        "promoted",
        "v0",
        "v1",
        passed=True,
        metrics={"candidate": {"warm/recall@100": 0.5}},
        details={"events": {"used": 1}},
    )
    append_decision(store, d)
    return generate_latest(export_metrics(store, d)[0]).decode()


def test_every_queried_metric_is_exported(encoder_exposition, tmp_path):
    encoder_names = _exposed_names(encoder_exposition)
    library_names = _exposed_names(_library_exposition())
    retrain_names = _exposed_names(retrain_exposition(tmp_path))
    # Sanity: the scrape really came from an encoder that served a request.
    assert {"a2v_encoder_batch_size_count", "a2v_rpc_requests_total", "a2v_encoder_queue_depth"} <= encoder_names

    rule_exprs = " ".join(r["expr"] for r in _rules())
    dash_exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))
    rules_test = (PROM / "rules_test.yml").read_text()
    used = set(METRIC.findall(rule_exprs)) | set(METRIC.findall(dash_exprs)) | set(METRIC.findall(rules_test))
    assert len(used) >= 10
    for name in sorted(used):
        if name.startswith(("a2v_rpc_", "a2v_encoder_")):
            assert name in encoder_names, f"{name} is queried but the encoder does not export it"
        elif name.startswith("a2v_retrain_"):
            assert name in retrain_names, f"{name} is queried but the retrain job does not export it"
        else:
            assert name in library_names, f"{name} is queried but create_metrics() does not export it"

"""The dashboard and the alert rules query only metrics that the three live services export.

Scrapes /metrics of the running gateway, ranker and encoder (after one call of each kind here; which
other e2e files ran on the same stack before depends on how the parallel run shares them out) and checks every a2v_* name used by
deploy/grafana/anime2vec.json and deploy/prometheus/rules.yml is among what they expose.
"""

import urllib.request

from anime2vec.v1 import common_pb2, gateway_pb2
from tests.deploy.test_observability import METRIC, _dashboard, _exposed_names, _rules, retrain_exposition

from .support import AUTH, Stack

# The series names a family of each kind gets with its first sample.
_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def test_every_dashboard_and_rule_metric_is_in_a_live_scrape(stack: Stack, tmp_path):
    # one request of each kind so the lazily created series (Qdrant timings, batch sizes) exist
    stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(favourites=[common_pb2.AnimeRef(anime_id=1)]), metadata=AUTH, timeout=30
    )
    stack.gateway.SearchText(gateway_pb2.SearchTextRequest(query="space bounty hunters"), metadata=AUTH, timeout=60)
    exposed: set[str] = set()
    for name in ("gateway", "ranker", "encoder"):
        text = urllib.request.urlopen(stack.metrics_url(name), timeout=10).read().decode()
        exposed |= _exposed_names(text)
        # a labelled family with no sample yet (no fallback has happened) is still exported: its
        # "# TYPE" line names it, and its series appear with the first event
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                family, kind = line.split()[2:4]
                exposed |= {family} | {family + suffix for suffix in _SERIES_SUFFIXES.get(kind, ())}
    used = {m for m in METRIC.findall(" ".join(r["expr"] for r in _rules())) if m.startswith("a2v_")}
    used |= {
        m
        for p in _dashboard()["panels"]
        for t in p.get("targets", [])
        for m in METRIC.findall(t["expr"])
        if m.startswith("a2v_")
    }
    assert len(used) >= 10
    # the nightly retrain job's metrics reach Prometheus through the Pushgateway, never from a live
    # service: set aside exactly what that job exports (tests/deploy/test_observability.py checks them)
    used -= _exposed_names(retrain_exposition(tmp_path))
    missing = sorted(used - exposed)
    assert not missing, f"queried but not exported by any live service: {missing}"

"""Every Prometheus metric the services export, created in one place with its unit and help.

One `Metrics` (one registry) per process, served over HTTP on the metrics port. Metrics a process
never touches (a gateway's encoder queue) simply stay at zero or absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_QDRANT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    rpc_requests: Counter  # a2v_rpc_requests_total{service,method,code}
    rpc_latency: Histogram  # a2v_rpc_latency_seconds{service,method}
    rpc_in_flight: Gauge  # a2v_rpc_in_flight{service,method}
    fallbacks: Counter  # a2v_fallbacks_total{service,reason}
    model_info: Gauge  # a2v_model_info{service,version,encoder,dim} = 1
    encoder_batch_size: Histogram  # a2v_encoder_batch_size
    encoder_queue_wait: Histogram  # a2v_encoder_queue_wait_seconds
    encoder_queue_depth: Gauge  # a2v_encoder_queue_depth
    qdrant_query: Histogram  # a2v_qdrant_query_seconds{operation}
    search_batch_size: Histogram  # a2v_search_batch_size
    memory_searches: Counter  # a2v_memory_searches_total: searches answered without Qdrant
    memory_search: Histogram  # a2v_memory_search_seconds: their latency
    model_offline_metric: Gauge  # a2v_model_offline_metric{version,scenario,metric}
    bundle_load_failures: Counter  # a2v_bundle_load_failures_total{service,reason}
    feedback_events: Counter  # a2v_feedback_events_total{kind,outcome}
    user_vector_updates: Counter  # a2v_user_vector_updates_total{reason}
    fold_in_latency: Histogram  # a2v_user_fold_in_seconds
    store_operation: Histogram  # a2v_store_operation_seconds{backend,store,operation}
    store_errors: Counter  # a2v_store_errors_total{backend,store,operation,kind}
    store_up: Gauge  # a2v_store_up{backend}
    store_connections: Gauge  # a2v_store_connections{state}
    added_anime_revision: Gauge  # a2v_added_anime_revision
    catalog_follow: Gauge  # a2v_catalog_follow_timestamp_seconds


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric in `registry` (a fresh one by default)."""
    r = registry if registry is not None else CollectorRegistry()
    return Metrics(
        registry=r,
        rpc_requests=Counter(
            "a2v_rpc_requests_total",
            "Completed RPCs by final status code (unit: requests).",
            ["service", "method", "code"],
            registry=r,
        ),
        rpc_latency=Histogram(
            "a2v_rpc_latency_seconds",
            "Server-side RPC handling time.",
            ["service", "method"],
            unit="seconds",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ),
        rpc_in_flight=Gauge(
            "a2v_rpc_in_flight", "RPCs being handled now (unit: requests).", ["service", "method"], registry=r
        ),
        fallbacks=Counter(
            "a2v_fallbacks_total",
            "Requests served by a fallback instead of the requested path (unit: requests).",
            ["service", "reason"],
            registry=r,
        ),
        model_info=Gauge(
            "a2v_model_info",
            "The model this process serves; always 1, the labels carry the information.",
            ["service", "version", "encoder", "dim"],
            registry=r,
        ),
        encoder_batch_size=Histogram(
            "a2v_encoder_batch_size",
            "Texts per encoder model call after micro-batching (unit: texts).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        ),
        encoder_queue_wait=Histogram(
            "a2v_encoder_queue_wait_seconds",
            "Time an encode request waited in the batching queue.",
            unit="seconds",
            buckets=_QUEUE_WAIT_BUCKETS,
            registry=r,
        ),
        encoder_queue_depth=Gauge(
            "a2v_encoder_queue_depth", "Texts waiting in the encoder batching queue (unit: texts).", registry=r
        ),
        qdrant_query=Histogram(
            "a2v_qdrant_query_seconds",
            "Qdrant call latency by operation (search, upsert, ...).",
            ["operation"],
            unit="seconds",
            buckets=_QDRANT_BUCKETS,
            registry=r,
        ),
        search_batch_size=Histogram(
            "a2v_search_batch_size",
            "Searches per call of the embedded Qdrant engine after coalescing concurrent searches (unit: searches).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        ),
        memory_searches=Counter(
            "a2v_memory_searches",
            "Searches answered from the served vectors in memory instead of by Qdrant (unit: searches).",
            registry=r,
        ),
        memory_search=Histogram(
            "a2v_memory_search_seconds",
            "Latency of a search answered from the served vectors in memory (the exact search's product, "
            "exclusions and top-k).",
            unit="seconds",
            buckets=_QDRANT_BUCKETS,
            registry=r,
        ),
        model_offline_metric=Gauge(
            "a2v_model_offline_metric",
            "Offline evaluation result of the served model version (dimensionless).",
            ["version", "scenario", "metric"],
            registry=r,
        ),
        bundle_load_failures=Counter(
            "a2v_bundle_load_failures_total",
            "Model versions the alias pointed at that could not be served, by "
            "reason: missing (no such bundle in the store), invalid (the bundle does not verify: checksum, format, "
            "dimensions) or error (loading or indexing it failed); the previous version keeps serving "
            "(unit: refusals).",
            ["service", "reason"],
            registry=r,
        ),
        feedback_events=Counter(
            "a2v_feedback_events_total",
            "Feedback events received by the ranker, by kind and outcome: "
            "applied (stored now) or duplicate (event id already stored) (unit: events).",
            ["kind", "outcome"],
            registry=r,
        ),
        user_vector_updates=Counter(
            "a2v_user_vector_updates_total",
            "User vectors recomputed and stored in the users collection, by "
            "reason: feedback (new events), stale (the stored vector missed events), version (first request "
            "after a new model version) (unit: updates).",
            ["reason"],
            registry=r,
        ),
        fold_in_latency=Histogram(
            "a2v_user_fold_in_seconds",
            "Time to recompute one user (ALS fold-in, user vector) and store it.",
            unit="seconds",
            buckets=_QDRANT_BUCKETS,
            registry=r,
        ),
        store_operation=Histogram(
            "a2v_store_operation_seconds",
            "Time of one operation on a store of record (one transaction: a "
            "feedback batch `record`, an added anime `put` / `add_new`, reads), failed ones included; backend "
            "sqlite or postgres, store feedback or added_anime.",
            ["backend", "store", "operation"],
            unit="seconds",
            buckets=_QDRANT_BUCKETS,
            registry=r,
        ),
        store_errors=Counter(
            "a2v_store_errors_total",
            "Store operations that did not succeed at once, by kind: unavailable (the "
            "database could not be reached or the connection broke: the call got UNAVAILABLE), retried (a deadlock "
            "or serialization failure between replicas, tried again) or error (the call failed) (unit: operations).",
            ["backend", "store", "operation", "kind"],
            registry=r,
        ),
        store_up=Gauge(
            "a2v_store_up",
            "1 when the last check of the store of record succeeded (a round trip to PostgreSQL; "
            "SQLite: opened), else 0.",
            ["backend"],
            registry=r,
        ),
        store_connections=Gauge(
            "a2v_store_connections",
            "This replica's PostgreSQL connection pool: size (open connections), idle, "
            "waiting (calls waiting for a connection) (unit: connections).",
            ["state"],
            registry=r,
        ),
        added_anime_revision=Gauge(
            "a2v_added_anime_revision",
            "The latest revision of the store of added anime this replica serves "
            "(equal on every replica once each has followed the others' writes).",
            registry=r,
        ),
        catalog_follow=Gauge(
            "a2v_catalog_follow_timestamp_seconds",
            "When this replica last checked the shared store for anime "
            "added through other replicas successfully (unix time).",
            unit="seconds",
            registry=r,
        ),
    )


def set_model_info(
    metrics: Metrics,
    service: str,
    version: str,
    encoder: str,
    dim: int,
    offline_metrics: Mapping[str, float] | None = None,
) -> None:
    """Publish the model now served, replacing the previous one's series (after a rollout the old
    version must disappear, not linger as a second 1). `offline_metrics` keys are
    "<scenario>/<metric>", as in ModelInfo.offline_metrics."""
    offline = []
    for key, value in (offline_metrics or {}).items():
        scenario, sep, metric = key.partition("/")
        if not sep:
            raise ValueError(f"offline metric key {key!r} is not '<scenario>/<metric>'")
        offline.append((scenario, metric, float(value)))
    metrics.model_info.clear()
    metrics.model_info.labels(service=service, version=version, encoder=encoder, dim=str(dim)).set(1)
    metrics.model_offline_metric.clear()
    for scenario, metric, value in offline:
        metrics.model_offline_metric.labels(version=version, scenario=scenario, metric=metric).set(value)


@dataclass
class MetricsHttpServer:
    port: int
    _httpd: WSGIServer

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsHttpServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0 picks a free one."""
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise RuntimeError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    return MetricsHttpServer(port=httpd.server_port, _httpd=httpd)

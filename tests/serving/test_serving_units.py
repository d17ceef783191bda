"""Settings validation, page tokens, error conversions and model-info metrics, without a server."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from pydantic_settings import SettingsConfigDict

from anime2vec.serving import errors
from anime2vec.serving.metrics import create_metrics, set_model_info
from anime2vec.serving.pagination import decode_page_token, encode_page_token, request_digest
from anime2vec.serving.settings import ServiceSettings, SettingsError
from anime2vec.v1 import common_pb2, ranker_pb2
from tests.serving.probe_service import call


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="A2V_DEMO_")
    api_key: str = "dev"


def test_settings_read_the_service_prefix(monkeypatch):
    monkeypatch.setenv("A2V_DEMO_GRPC_PORT", "6001")
    monkeypatch.setenv("A2V_DEMO_LOG_LEVEL", "debug")
    monkeypatch.setenv("A2V_OTHER_METRICS_PORT", "1")  # another service's variable: ignored
    s = DemoSettings.from_env()
    assert (s.grpc_port, s.log_level, s.metrics_port) == (6001, "DEBUG", 9100)


def test_settings_errors_name_every_variable_and_never_echo_values(monkeypatch):
    monkeypatch.setenv("A2V_DEMO_GRPC_PORT", "70000")
    monkeypatch.setenv("A2V_DEMO_MAX_WORKERS", "0")
    monkeypatch.setenv("A2V_DEMO_LOG_LEVEL", "chatty")
    monkeypatch.setenv("A2V_DEMO_API_KEY", "s3cret-value")
    monkeypatch.setenv("A2V_DEMO_SHUTDOWN_GRACE_S", "s3cret-value")
    with pytest.raises(SettingsError) as ei:
        DemoSettings.from_env()
    msg = str(ei.value)
    for var in ("A2V_DEMO_GRPC_PORT", "A2V_DEMO_MAX_WORKERS", "A2V_DEMO_LOG_LEVEL", "A2V_DEMO_SHUTDOWN_GRACE_S"):
        assert var in msg
    assert "A2V_DEMO_API_KEY" not in msg and "s3cret" not in msg and "70000" not in msg


def test_settings_reject_one_port_for_both_servers():
    with pytest.raises(SettingsError, match="grpc_port and metrics_port are both 7000"):
        DemoSettings.from_env(grpc_port=7000, metrics_port=7000)
    assert DemoSettings.from_env(grpc_port=0, metrics_port=0).grpc_port == 0  # both "pick a free one"


def _request(
    offset_token: str = "", limit: int = 10, diversity: float = 0.0, explain: bool = False
) -> ranker_pb2.SimilarItemsRequest:
    return ranker_pb2.SimilarItemsRequest(
        anime_id=20,
        options=common_pb2.RecommendOptions(limit=limit, page_token=offset_token, diversity=diversity, explain=explain),
    )


def test_page_token_round_trip_and_binding():
    digest = request_digest(_request(), "v1")
    token = encode_page_token(30, digest)
    for offset in (0, 30, 10**12):  # the written-out JSON is json.dumps's, byte for byte
        raw = json.dumps({"o": offset, "d": digest}, separators=(",", ":")).encode()
        assert encode_page_token(offset, digest) == base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(ValueError):
        encode_page_token(1, 'x"}')  # not a digest: never written into the JSON
    # the digest ignores the token itself, so the follow-up request verifies
    assert request_digest(_request(token), "v1") == digest
    assert decode_page_token(token, request_digest(_request(token), "v1")) == 30
    assert decode_page_token("", digest) == 0
    # page size and explanations may change between pages: the ranking they continue is the same
    assert request_digest(_request(limit=20, explain=True), "v1") == digest
    for other in (request_digest(_request(diversity=0.5), "v1"), request_digest(_request(), "v2")):
        with pytest.raises(errors.ServiceError) as ei:
            decode_page_token(token, other)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "different request" in ei.value.message
    for garbled in ("not-a-token", encode_page_token(30, digest)[:-3], "W10", encode_page_token(-1, digest)):
        with pytest.raises(errors.ServiceError, match="options.page_token: not a page token"):
            decode_page_token(garbled, digest)


def test_error_constructors():
    e = errors.resource_exhausted("queue full", reason="ENCODER_QUEUE_FULL", retry_after_s=0.25)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = e.to_status()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.details == "queue full"
    assert status.trailing_metadata[0][0] == "grpc-status-details-bin"
    with pytest.raises(ValueError):
        errors.invalid_argument({})
    with pytest.raises(ValueError):
        errors.ServiceError(grpc.StatusCode.OK, "fine")


def test_downstream_error_passes_through_with_details(serve):
    _, channel = serve()
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Missing")
    relayed = errors.ServiceError.from_rpc_error(ei.value)
    assert relayed.code == grpc.StatusCode.NOT_FOUND
    assert relayed.message == ei.value.details()
    original = dict(ei.value.trailing_metadata())["grpc-status-details-bin"]
    assert relayed.to_status().trailing_metadata[0][1] == original


def test_model_info_replaces_the_previous_version():
    m = create_metrics()
    set_model_info(m, "ranker", "v1", "all-MiniLM-L6-v2", 384, {"cold_items/recall@100": 0.41})
    set_model_info(m, "ranker", "v2", "all-MiniLM-L6-v2", 384, {"cold_items/recall@100": 0.45, "warm/ndcg@20": 0.2})
    get = m.registry.get_sample_value
    assert (
        get("a2v_model_info", {"service": "ranker", "version": "v1", "encoder": "all-MiniLM-L6-v2", "dim": "384"})
        is None
    )
    assert (
        get("a2v_model_info", {"service": "ranker", "version": "v2", "encoder": "all-MiniLM-L6-v2", "dim": "384"}) == 1
    )
    assert get("a2v_model_offline_metric", {"version": "v2", "scenario": "cold_items", "metric": "recall@100"}) == 0.45
    assert get("a2v_model_offline_metric", {"version": "v1", "scenario": "cold_items", "metric": "recall@100"}) is None
    with pytest.raises(ValueError, match="not '<scenario>/<metric>'"):
        set_model_info(m, "ranker", "v3", "x", 1, {"recall": 0.1})
    # a rejected update leaves the published model as it was
    assert (
        get("a2v_model_info", {"service": "ranker", "version": "v2", "encoder": "all-MiniLM-L6-v2", "dim": "384"}) == 1
    )


def test_every_metric_has_help_and_the_agreed_name():
    names = {metric.name: metric for metric in create_metrics().registry.collect()}
    # prometheus_client reports counters without _total
    assert set(names) == {
        "a2v_rpc_requests",
        "a2v_rpc_latency_seconds",
        "a2v_rpc_in_flight",
        "a2v_fallbacks",
        "a2v_model_info",
        "a2v_encoder_batch_size",
        "a2v_encoder_queue_wait_seconds",
        "a2v_encoder_queue_depth",
        "a2v_qdrant_query_seconds",
        "a2v_search_batch_size",
        "a2v_memory_searches",
        "a2v_memory_search_seconds",
        "a2v_model_offline_metric",
        "a2v_bundle_load_failures",
        "a2v_feedback_events",
        "a2v_user_vector_updates",
        "a2v_user_fold_in_seconds",
        # the stores of record (SQLite or PostgreSQL) and a replica following the shared catalogue
        "a2v_store_operation_seconds",
        "a2v_store_errors",
        "a2v_store_up",
        "a2v_store_connections",
        "a2v_added_anime_revision",
        "a2v_catalog_follow_timestamp_seconds",
    }
    assert all(m.documentation for m in names.values())
    assert names["a2v_rpc_latency_seconds"].unit == "seconds"


def test_error_trailers_fit_the_clients_limit_in_bytes_not_characters():
    """Found by the fuzzer: 512 non-ASCII characters percent-encode to ~5 KB of grpc-message and the
    client refused the trailers (RESOURCE_EXHAUSTED instead of the status)."""
    from urllib.parse import quote

    from anime2vec.serving.errors import invalid_argument

    err = invalid_argument({f"options.filters.include_genres[{i}]": "ü%" * 300 for i in range(30)}, "é%" * 600)
    status = err.to_status()
    wire = len(quote(status.details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")) + sum(
        len(v) * 4 // 3 for _, v in status.trailing_metadata
    )
    assert wire < 6000 and status.details.startswith("é%")

"""build_server: metrics by status code, error mapping, health, reflection, limits, shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from anime2vec.serving.errors import ErrorDetails
from anime2vec.serving.logging import configure_logging
from anime2vec.v1 import encoder_pb2
from tests.serving.probe_service import PROBE, call


def count(running, method: str, code: str) -> float:
    value = running.metrics.registry.get_sample_value(
        "a2v_rpc_requests_total", {"service": "probe", "method": f"{PROBE}/{method}", "code": code}
    )
    return value or 0.0


def test_calls_are_counted_by_final_code(serve):
    running, channel = serve()
    call(channel, "Ok")
    call(channel, "Ok")
    for method in ("Boom", "Invalid", "Abort", "SetCode"):
        with pytest.raises(grpc.RpcError):
            call(channel, method)
    assert count(running, "Ok", "OK") == 2
    assert count(running, "Boom", "INTERNAL") == 1
    assert count(running, "Invalid", "INVALID_ARGUMENT") == 1
    assert count(running, "Abort", "PERMISSION_DENIED") == 1
    assert count(running, "SetCode", "NOT_FOUND") == 1
    assert count(running, "Ok", "INTERNAL") == 0
    reg = running.metrics.registry
    assert reg.get_sample_value("a2v_rpc_latency_seconds_count", {"service": "probe", "method": f"{PROBE}/Ok"}) == 2
    assert reg.get_sample_value("a2v_rpc_in_flight", {"service": "probe", "method": f"{PROBE}/Ok"}) == 0
    # and the same numbers over the metrics HTTP endpoint
    body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    assert f'a2v_rpc_requests_total{{code="INTERNAL",method="{PROBE}/Boom",service="probe"}} 1.0' in body


def test_in_flight_gauge_counts_running_calls(serve, probe):
    running, channel = serve()
    fut = channel.unary_unary(
        f"/{PROBE}/Slow",
        request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
        response_deserializer=encoder_pb2.EncodeResponse.FromString,
    ).future(encoder_pb2.EncodeRequest(), timeout=30)
    assert probe.entered.wait(10)
    labels = {"service": "probe", "method": f"{PROBE}/Slow"}
    assert running.metrics.registry.get_sample_value("a2v_rpc_in_flight", labels) == 1
    probe.release.set()
    assert fut.result().dim == 1
    assert running.metrics.registry.get_sample_value("a2v_rpc_in_flight", labels) == 0


class RequireKey(grpc.ServerInterceptor):
    """An authentication interceptor as a gateway would write one: a fresh aborting handler."""

    def intercept_service(self, continuation, details):
        if ("authorization", "Bearer k1") in details.invocation_metadata:
            return continuation(details)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing key")
        )


def test_inner_interceptor_aborts_are_counted(serve):
    running, channel = serve(interceptors=[RequireKey()])
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Ok")
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(channel, "Ok", metadata=[("authorization", "Bearer k1")]).dim == 7
    assert count(running, "Ok", "UNAUTHENTICATED") == 1 and count(running, "Ok", "OK") == 1


def test_unexpected_exception_is_internal_without_internals(serve, caplog):
    _, channel = serve()
    with caplog.at_level(logging.ERROR, logger="anime2vec.serving"), pytest.raises(grpc.RpcError) as ei:
        call(channel, "Boom")
    err = ei.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details().startswith("internal error (id ")
    assert "hunter2" not in err.details() and "Traceback" not in err.details() and "ValueError" not in err.details()
    error_id = err.details().removeprefix("internal error (id ").rstrip(")")
    # the stack goes to the log, under the id the client was given
    logged = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
    assert len(logged) == 1 and logged[0].exc_info[0] is ValueError


def test_rich_details_round_trip(serve):
    _, channel = serve()
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Invalid")
    d = ErrorDetails.from_rpc_error(ei.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.field_violations == {"texts[3]": "too long", "options.limit": "must be <= 100"}
    assert d.message == "texts[3]: too long; options.limit: must be <= 100"

    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Missing")
    d = ErrorDetails.from_rpc_error(ei.value)
    assert d.code == grpc.StatusCode.NOT_FOUND
    assert d.suggestions == ["Naruto", "Naruto: Shippuuden"]
    assert (d.reason, d.domain) == ("ANIME_NOT_FOUND", "anime2vec.v1")
    assert (d.resource_type, d.resource_name) == ("anime", "Narutoo")
    assert list(d.field_violations) == ["favourites[0].title"]
    assert "did you mean: 'Naruto', 'Naruto: Shippuuden'?" in d.message


def test_plain_errors_have_no_details(serve):
    _, channel = serve()
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Abort")
    d = ErrorDetails.from_rpc_error(ei.value)
    assert (d.code, d.message, d.field_violations, d.reason) == (grpc.StatusCode.PERMISSION_DENIED, "no", {}, "")


def test_malformed_request_bytes_are_invalid_argument(serve):
    running, channel = serve()
    raw = channel.unary_unary(f"/{PROBE}/Ok")  # no serializers: bytes go on the wire as they are
    assert (
        raw(b"\x0a\x03abc", timeout=10) == encoder_pb2.EncodeResponse(model_name="1 texts", dim=7).SerializeToString()
    )
    with pytest.raises(grpc.RpcError) as ei:
        raw(b"\x0a\x02\xff\xfe", timeout=10)  # texts[0] with invalid UTF-8
    d = ErrorDetails.from_rpc_error(ei.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in d.field_violations["request"]
    assert count(running, "Ok", "INVALID_ARGUMENT") == 1


def test_concurrency_limit_rejects_with_resource_exhausted(serve, probe):
    _, channel = serve(max_concurrent_rpcs=1)
    slow = channel.unary_unary(
        f"/{PROBE}/Slow",
        request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
        response_deserializer=encoder_pb2.EncodeResponse.FromString,
    )
    fut = slow.future(encoder_pb2.EncodeRequest(), timeout=30)
    assert probe.entered.wait(10)
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Ok")
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    probe.release.set()
    assert fut.result().dim == 1
    assert call(channel, "Ok").dim == 7


def test_message_size_limit(serve):
    _, channel = serve(max_message_bytes=64 * 1024)
    with pytest.raises(grpc.RpcError) as ei:
        call(channel, "Ok", encoder_pb2.EncodeRequest(texts=["x" * 100_000]))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection(serve):
    running, channel = serve()
    check = health_pb2_grpc.HealthStub(channel).Check
    serving = health_pb2.HealthCheckResponse.SERVING
    assert check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
    assert check(health_pb2.HealthCheckRequest(service=PROBE), timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as ei:
        check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    running.set_serving(PROBE, False)
    assert (
        check(health_pb2.HealthCheckRequest(service=PROBE), timeout=10).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert services == {PROBE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_stop_drains_in_flight_calls_then_runs_callbacks(serve, probe):
    order = []
    running, channel = serve(on_stop=[lambda: order.append("on_stop")])
    slow = channel.unary_unary(
        f"/{PROBE}/Slow",
        request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
        response_deserializer=encoder_pb2.EncodeResponse.FromString,
    )
    fut = slow.future(encoder_pb2.EncodeRequest(), timeout=30)
    assert probe.entered.wait(10)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    # shutting down: health says NOT_SERVING while the in-flight call is still running
    deadline = time.monotonic() + 10
    while (
        running.health.Check(health_pb2.HealthCheckRequest(service=PROBE), None).status
        != health_pb2.HealthCheckResponse.NOT_SERVING
    ):
        assert time.monotonic() < deadline, "health never went NOT_SERVING"
        time.sleep(0.01)
    assert not fut.done()
    assert order == []
    probe.release.set()
    assert fut.result().dim == 1  # the in-flight call finished within the grace period
    stopper.join(10)
    assert order == ["on_stop"]
    running.stop()  # idempotent
    assert order == ["on_stop"]


def test_request_stop_ends_wait_for_termination(serve):
    running, _ = serve()
    waiter = threading.Thread(target=running.wait_for_termination, kwargs={"handle_signals": False})
    waiter.start()
    running.request_stop()
    waiter.join(15)
    assert not waiter.is_alive()


def test_one_json_log_line_per_call_without_bodies_or_keys(serve, capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "probe")
    try:
        _, channel = serve()
        call(
            channel,
            "Ok",
            encoder_pb2.EncodeRequest(texts=["SECRET-BODY"]),
            metadata=[("authorization", "Bearer SECRET-KEY")],
        )
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    rpc = [entry for entry in lines if entry.get("msg") == "rpc"]
    assert len(rpc) == 1
    assert rpc[0]["method"] == f"/{PROBE}/Ok" and rpc[0]["code"] == "OK" and rpc[0]["service"] == "probe"
    assert rpc[0]["duration_ms"] >= 0 and rpc[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert any(entry.get("msg") == "serving" and entry["grpc_port"] > 0 for entry in lines)
    out = json.dumps(lines)
    assert "SECRET" not in out

"""build_server's bounds on what one call may hold (anime2vec/serving/call_limits.py), shared by the
encoder, ranker and gateway: the request message within REQUEST_TIMEOUT_S, a server deadline of
MAX_CALL_S, MAX_WORKERS handlers at once, a Refusal answered without reading the request, made-up
method paths labelled "unknown". Over real sockets, with the probe service; counts and statuses only."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from anime2vec.serving.call_limits import Watchdog
from anime2vec.serving.errors import ErrorDetails, ServiceError
from anime2vec.serving.server import Refusal
from anime2vec.v1 import encoder_pb2
from tests.serving.probe_service import PROBE, call

C = grpc.StatusCode


def counted(running, method: str, code: str, n: int) -> None:
    """Wait (a hang guard) until `n` calls of `method` were counted with `code`: the server counts a
    call after its caller already has the answer."""
    sample = {"service": "probe", "method": f"{PROBE}/{method}", "code": code}
    deadline = time.monotonic() + 30
    while running.metrics.registry.get_sample_value("a2v_rpc_requests_total", sample) != n:
        assert time.monotonic() < deadline, f"{method} {code} counted {n} times"
        time.sleep(0.05)


def stalled(channel: grpc.Channel, path: str, n: int = 1, **kw):
    """n calls that send headers and never their message; (futures, release)."""
    release = threading.Event()

    def body():
        release.wait()
        yield encoder_pb2.EncodeRequest().SerializeToString()

    return [channel.stream_unary(path).future(body(), **kw) for _ in range(n)], release


def test_a_call_whose_message_never_comes_is_ended(serve):
    running, channel = serve(request_timeout_s=0.5, max_concurrent_rpcs=2)
    futures, release = stalled(channel, f"/{PROBE}/Ok", 2)
    try:
        for f in futures:
            assert f.exception(30) is not None and f.code() == C.DEADLINE_EXCEEDED
            assert "no request message within 0.5 s" in f.details()
        assert call(channel, "Ok").dim == 7  # the slots are free again
        counted(running, "Ok", "DEADLINE_EXCEEDED", 2)
    finally:
        release.set()


def test_stalled_health_checks_and_watches_are_ended_too(serve):
    _, channel = serve(request_timeout_s=0.5)
    for path in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        release = threading.Event()

        def body():
            release.wait()
            yield health_pb2.HealthCheckRequest().SerializeToString()

        call_ = channel.stream_stream(path)(body())
        with pytest.raises(grpc.RpcError) as e:
            list(call_)
        release.set()
        assert e.value.code() == C.DEADLINE_EXCEEDED, path


def test_a_health_watch_still_streams(serve):
    running, channel = serve(request_timeout_s=0.5)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    stream = watch(health_pb2.HealthCheckRequest(service=PROBE), timeout=30)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    running.set_serving(PROBE, False)
    assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING  # past REQUEST_TIMEOUT_S is fine
    stream.cancel()


def test_a_call_without_a_deadline_gets_the_servers(serve, probe):
    running, channel = serve(max_call_s=0.5)
    with pytest.raises(grpc.RpcError) as e:
        call(channel, "Slow", timeout=None)
    assert e.value.code() == C.DEADLINE_EXCEEDED and "server's limit of 0.5 s" in e.value.details()
    probe.release.set()
    counted(running, "Slow", "DEADLINE_EXCEEDED", 1)


def test_handlers_see_the_capped_deadline(serve):
    seen = []

    class Remaining(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)

            def behaviour(request, context):
                seen.append(context.time_remaining())
                return handler.unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                behaviour, handler.request_deserializer, handler.response_serializer
            )

    _, channel = serve(max_call_s=5, interceptors=[Remaining()])
    call(channel, "Ok", timeout=None)
    call(channel, "Ok", timeout=2)
    assert 0 < seen[0] <= 5 and 0 < seen[1] <= 2.5  # the caller's own when shorter (its clock, rounded)


def test_stalled_calls_take_no_worker(serve, probe):
    """One worker, four slots: three callers that never send their message leave the worker free."""
    _, channel = serve(max_workers=1, max_concurrent_rpcs=4, request_timeout_s=30)
    futures, release = stalled(channel, f"/{PROBE}/Slow", 3)
    try:
        probe.release.set()
        assert call(channel, "Ok", timeout=30).dim == 7
    finally:
        release.set()
        for f in futures:
            f.cancel()


def test_a_refusal_is_answered_without_the_request_and_counted(serve):
    class RefuseAll(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if continuation(details) is None:
                return None
            return Refusal(ServiceError(C.PERMISSION_DENIED, "no"))

    running, channel = serve(max_concurrent_rpcs=1, request_timeout_s=60, interceptors=[RefuseAll()])
    for _ in range(10):  # one slot: each refusal must be over, its message never sent, before the next
        (future,), release = stalled(channel, f"/{PROBE}/Ok")
        try:
            assert future.exception(30) is not None and future.code() == C.PERMISSION_DENIED
        finally:
            release.set()
    counted(running, "Ok", "PERMISSION_DENIED", 10)


def test_made_up_methods_are_labelled_unknown(serve):
    class RefuseAll(grpc.ServerInterceptor):  # as an auth interceptor does before any method lookup
        def intercept_service(self, continuation, details):
            return Refusal(ServiceError(C.UNAUTHENTICATED, "no key"))

    running, channel = serve(interceptors=[RefuseAll()])
    for i in range(50):
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(f"/made.up.Service{i}/{'x' * 500}")(b"", timeout=10)
    with pytest.raises(grpc.RpcError):
        call(channel, "Ok")
    labels = {
        s.labels["method"]
        for m in running.metrics.registry.collect()
        if m.name == "a2v_rpc_requests"
        for s in m.samples
    }
    assert labels == {"unknown", f"{PROBE}/Ok"}


def test_an_empty_request_stream_is_invalid_argument(serve):
    _, channel = serve()
    with pytest.raises(grpc.RpcError) as e:
        channel.stream_unary(f"/{PROBE}/Ok")(iter(()), timeout=10)
    assert e.value.code() == C.INVALID_ARGUMENT
    assert ErrorDetails.from_rpc_error(e.value).field_violations == {"request": "no request message"}


def test_per_connection_bound_queues_a_connections_extra_calls(serve, probe):
    """Two calls at most per connection: the third waits in its client until one ends, then succeeds."""
    running, channel = serve(max_concurrent_rpcs_per_connection=2, max_workers=4)
    stub = channel.unary_unary(
        f"/{PROBE}/Slow",
        request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
        response_deserializer=encoder_pb2.EncodeResponse.FromString,
    )
    futures = [stub.future(encoder_pb2.EncodeRequest(), timeout=60) for _ in range(3)]
    assert probe.entered.wait(10)
    labels = {"service": "probe", "method": f"{PROBE}/Slow"}
    deadline = time.monotonic() + 30
    while running.metrics.registry.get_sample_value("a2v_rpc_in_flight", labels) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # give a third call the chance to arrive, were it not held back
    assert running.metrics.registry.get_sample_value("a2v_rpc_in_flight", labels) == 2
    probe.release.set()
    assert [f.result().dim for f in futures] == [1, 1, 1]


def test_watchdog_runs_due_actions_and_skips_cancelled_ones():
    dog = Watchdog("test-watchdog")
    ran = []
    done = threading.Event()
    now = time.monotonic()
    dog.schedule(now + 0.2, lambda: ran.append("late"))
    cancelled = dog.schedule(now + 0.05, lambda: ran.append("cancelled"))
    dog.schedule(now + 0.1, lambda: ran.append("early"))
    dog.schedule(now + 0.3, done.set)
    cancelled.cancel()
    assert done.wait(10)
    assert ran == ["early", "late"] and dog.pending() == 0
    many = [dog.schedule(now + 3600, lambda: None) for _ in range(3000)]
    for alarm in many:
        alarm.cancel()
    dog.schedule(now + 3600, lambda: None)  # compacts: the cancelled ones are dropped
    assert dog.pending() == 1 and len(dog._heap) < 100
    dog.stop()


def test_probe_calls_have_their_own_small_budget(serve):
    """Health checks need no key: beyond max_probe_calls at once they are refused, unread, so they
    cannot hold the slots the API needs; a running health Watch does not hold one."""
    _, channel = serve(max_probe_calls=2, max_concurrent_rpcs=8, request_timeout_s=30)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    streams = []
    for _ in range(3):  # one after another: each holds its slot only until it is set up
        streams.append(watch(health_pb2.HealthCheckRequest(service=PROBE), timeout=30))
        assert next(streams[-1]).status == health_pb2.HealthCheckResponse.SERVING
    # Five stalled checks at once: which two the server admits first is its dispatch order, so the
    # test counts, it does not name them. The admitted two wait for their message; three are refused.
    futures, release = stalled(channel, "/grpc.health.v1.Health/Check", 5)
    try:
        deadline = time.monotonic() + 30
        while sum(f.done() for f in futures) < 3:
            assert time.monotonic() < deadline, "the checks beyond the budget were not refused"
            time.sleep(0.02)
        refused = [f for f in futures if f.done()]
        held = [f for f in futures if not f.done()]
        assert len(refused) == 3 and len(held) == 2
        for f in refused:
            assert f.code() == C.RESOURCE_EXHAUSTED
            assert ErrorDetails.from_rpc_error(f).reason == "TOO_MANY_PROBE_CALLS"
        assert call(channel, "Ok").dim == 7  # the API is not affected
        assert not any(f.done() for f in held)  # still holding their slots, waiting for a message
    finally:
        release.set()
        for s in streams:
            s.cancel()
    assert [f.result(30) is not None for f in held] == [True, True]

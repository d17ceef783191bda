"""Stalled callers over a real socket: calls that send their headers and never their request message,
with no deadline, must not take the gateway away from everyone else (issue 14, item 1).

- Without a key: each is refused (UNAUTHENTICATED) at once, without waiting for a body, so it holds
  no concurrency slot; authenticated calls keep succeeding.
- With a valid key: one connection holds at most MAX_CONCURRENT_RPCS_PER_CONNECTION calls (the rest
  wait in the caller's own HTTP/2 queue), and each gets DEADLINE_EXCEEDED when its message has not come
  within REQUEST_TIMEOUT_S; calls on other connections keep succeeding.
- Health checks (no key needed anywhere) hold at most MAX_PROBE_CALLS slots; the rest are refused
  at once (RESOURCE_EXHAUSTED).
- A call without a deadline gets the server's own (MAX_CALL_S): the gateway stops waiting for a slow
  ranker and answers DEADLINE_EXCEEDED.
Everything is counted (statuses, the in-flight gauge), never timed.
"""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import pytest

from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import READER, S, auth, gauge, start_gateway, wait_until

C = grpc.StatusCode
LIMIT, PER_CONNECTION = 64, 16  # the gateway's MAX_CONCURRENT_RPCS and its per-connection bound
RECOMMEND = "/anime2vec.v1.GatewayService/Recommend"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GUARD_S = 60  # hang guards only


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(
        tmp_path_factory.mktemp("stalled"),
        env={
            "MAX_CONCURRENT_RPCS": str(LIMIT),
            "MAX_CONCURRENT_RPCS_PER_CONNECTION": str(PER_CONNECTION),
            "REQUEST_TIMEOUT_S": "2",
            "MAX_CALL_S": "3",
        },
    )
    yield gw
    gw.ranker.release_slow.set()
    stop()


def recommend_request() -> bytes:
    return gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")]).SerializeToString()


class Stalled:
    """n calls on a connection of their own that send headers and then nothing (no deadline)."""

    def __init__(self, channel: grpc.Channel, n: int, metadata=(), path: str = RECOMMEND):
        self.release = threading.Event()
        call = channel.stream_unary(path)  # raw bytes: what a hand-written client sends

        def body():
            self.release.wait()  # never, until the test is over
            yield recommend_request()

        self.futures = [call.future(body(), metadata=metadata) for _ in range(n)]

    def codes(self) -> Counter:
        return Counter(f.code() for f in self.futures if f.done())

    def done(self) -> int:
        return sum(f.done() for f in self.futures)

    def close(self) -> None:
        self.release.set()
        for f in self.futures:
            f.cancel()


def authenticated_calls(gw, n: int = 10) -> Counter:
    stub = gw.stub
    out: Counter = Counter()
    for _ in range(n):
        try:
            stub.Recommend(
                gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")]), metadata=auth(READER), timeout=30
            )
            out[C.OK] += 1
        except grpc.RpcError as e:
            out[e.code()] += 1
    return out


def in_flight(gw) -> float:
    return gauge(gw.metrics(), "a2v_rpc_in_flight", method=RECOMMEND.lstrip("/"))


def test_stalled_calls_without_a_key_hold_no_slot(gateway):
    stalled = Stalled(gateway.own_channel(), LIMIT + 16)
    try:
        # Unfixed, the first LIMIT fill every slot and the rest are refused RESOURCE_EXHAUSTED at once;
        # fixed, all are refused UNAUTHENTICATED at once. Either way 16 are done when the slots are taken.
        wait_until(lambda: stalled.done() >= 16, GUARD_S, "the stalled calls reached the gateway")
        assert authenticated_calls(gateway) == Counter({C.OK: 10})
        wait_until(lambda: stalled.done() == LIMIT + 16, GUARD_S, "every unauthenticated call was answered")
        assert stalled.codes() == Counter({C.UNAUTHENTICATED: LIMIT + 16})  # none waited for its body
    finally:
        stalled.close()


def test_stalled_health_checks_hold_only_the_probe_slots(gateway):
    """Health checking needs no key anywhere: stalled checks from several connections may hold at
    most MAX_PROBE_CALLS (8) slots; the rest are refused at once, and the API keeps answering."""
    n_connections = 5
    stalled = [Stalled(gateway.own_channel(), PER_CONNECTION, path=HEALTH_CHECK) for _ in range(n_connections)]
    n = n_connections * PER_CONNECTION
    try:
        # unfixed, the first LIMIT fill every slot and the rest are refused at once
        wait_until(lambda: sum(s.done() for s in stalled) >= n - LIMIT, GUARD_S, "the checks reached the gateway")
        assert authenticated_calls(gateway) == Counter({C.OK: 10})
        # fixed, all but the 8 probe slots' holders are refused at once; on a loaded machine not all of the
        # refusals are back by the time the calls above are answered (seen: 57 of 72), so wait for them
        # (unfixed, the rest come back only when REQUEST_TIMEOUT_S ends them, and the codes below differ)
        wait_until(lambda: sum(s.done() for s in stalled) >= n - 8, GUARD_S, "the refusals came back")
        codes = sum((s.codes() for s in stalled), Counter())
        assert codes == Counter({C.RESOURCE_EXHAUSTED: n - 8})  # all but the 8 probe slots' holders
        wait_until(lambda: sum(s.done() for s in stalled) == n, GUARD_S, "the 8 were ended (REQUEST_TIMEOUT_S)")
        assert sum((s.codes() for s in stalled), Counter()) == Counter(
            {C.RESOURCE_EXHAUSTED: n - 8, C.DEADLINE_EXCEEDED: 8}
        )
    finally:
        for s in stalled:
            s.close()


def test_stalled_calls_with_a_key_are_bounded_per_connection_and_in_time(gateway):
    n = LIMIT + 1  # unfixed, the last one is refused RESOURCE_EXHAUSTED: the slots are full
    stalled = Stalled(gateway.own_channel(), n, metadata=auth(READER))
    try:
        wait_until(
            lambda: in_flight(gateway) >= PER_CONNECTION or stalled.done() > 0,
            GUARD_S,
            "the stalled calls reached the gateway",
        )
        assert in_flight(gateway) <= PER_CONNECTION  # one connection holds no more than its share
        assert authenticated_calls(gateway) == Counter({C.OK: 10})
        # every stalled call ends, as DEADLINE_EXCEEDED (no message within REQUEST_TIMEOUT_S)
        wait_until(lambda: stalled.done() == n, GUARD_S, "every stalled call was ended by the gateway")
        assert stalled.codes() == Counter({C.DEADLINE_EXCEEDED: n})
        wait_until(lambda: in_flight(gateway) == 0, GUARD_S, "no call left in flight")
    finally:
        stalled.close()
    assert authenticated_calls(gateway) == Counter({C.OK: 10})


def test_a_call_without_a_deadline_gets_the_servers_own(gateway):
    """The fake ranker answers a favourite id SLOW_ID only when released: a caller that set no
    deadline is answered DEADLINE_EXCEEDED once MAX_CALL_S has passed, not after the ranker."""
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=gateway.ranker.SLOW_ID)])
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Recommend(request, metadata=auth(READER))  # no timeout
    assert e.value.code() == C.DEADLINE_EXCEEDED
    assert "Traceback" not in (e.value.details() or "")
    assert authenticated_calls(gateway, 3) == Counter({C.OK: 3})

"""Overload over real sockets: bursts of 4× a service's MAX_CONCURRENT_RPCS in flight at once.

What must hold (statuses and counts, never timings):
- the service sheds the excess with RESOURCE_EXHAUSTED and nothing else fails; accepted calls succeed;
- shed calls never reach a handler (the service's own per-status counters show only the accepted
  ones), i.e. they are refused on arrival instead of queueing for a slot;
- a gateway whose ranker sheds answers RESOURCE_EXHAUSTED (reason RANKER_OVERLOADED, with
  RetryInfo), not UNKNOWN / INTERNAL / UNAVAILABLE, and does not retry it: a counting pass-through
  between gateway and ranker sees exactly one ranker attempt per gateway call (and three for a
  call answered UNAVAILABLE, which the retry policy does retry);
- after the burst each service reports SERVING and answers normally.

The burst sizes scale with A2V_LOAD_SCALE.
"""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from tests.e2e.support import AUTH
from tests.load.support import (
    CountingProxy,
    Outcome,
    burst,
    codes_seen,
    scaled,
    scrape,
    shared_stack,
    stack_processes,
    start_together,
)

pytestmark = pytest.mark.load

S = common_pb2
C = grpc.StatusCode
RANKER_LIMIT, GATEWAY_LIMIT = 2, 3
MAX_BURSTS = 30  # bursts until both outcomes were seen (one burst normally suffices)
RECOMMEND = "anime2vec.v1.RankerService/RecommendFromFavourites"
GW_RECOMMEND = "anime2vec.v1.GatewayService/Recommend"


def _metrics_url(proc) -> str:
    return f"http://{proc.spec.host}:{proc.spec.metrics_port}/metrics"


@pytest.fixture(scope="module")
def overload(request, tmp_path_factory, bundle):
    """A ranker limited to RANKER_LIMIT concurrent RPCs behind a counting pass-through and a gateway
    with default limits, and a gateway limited to GATEWAY_LIMIT in front of the shared stack's
    ranker; all use the shared stack's encoder."""
    stack = shared_stack(request.config, tmp_path_factory, bundle)
    stack.ensure_running()
    root = tmp_path_factory.mktemp("overload")
    encoder = stack.procs["encoder"].spec.address
    limited = {"MAX_CONCURRENT_RPCS": str(RANKER_LIMIT), "MAX_WORKERS": str(RANKER_LIMIT)}
    procs = {
        "ranker": stack_processes(
            root / "small-ranker", stack.bundle, names=("ranker",), env={"ranker": limited}, encoder_address=encoder
        )["ranker"]
    }
    proxy = CountingProxy(procs["ranker"].spec.address)
    procs["gateway-over-proxy"] = stack_processes(
        root / "gw-proxy", stack.bundle, names=("gateway",), encoder_address=encoder, ranker_address=proxy.address
    )["gateway"]
    limited = {"MAX_CONCURRENT_RPCS": str(GATEWAY_LIMIT), "MAX_WORKERS": str(GATEWAY_LIMIT)}
    procs["small-gateway"] = stack_processes(
        root / "gw-small",
        stack.bundle,
        names=("gateway",),
        env={"gateway": limited},
        encoder_address=encoder,
        ranker_address=stack.procs["ranker"].spec.address,
    )["gateway"]
    try:
        start_together(procs)
        channels = {name: grpc.insecure_channel(p.spec.address) for name, p in procs.items()}
        yield procs, channels, proxy
        for ch in channels.values():
            ch.close()
    finally:
        for p in procs.values():
            p.stop()
        proxy.close()


def bursts_until_both(fire, size: int) -> tuple[Counter, list[Outcome]]:
    """Fire bursts of `size` concurrent calls until some were accepted and some shed; the
    outcomes counted by (code, ErrorInfo reason), and the failures themselves."""
    seen: Counter = Counter()
    failed: list[Outcome] = []
    for _ in range(MAX_BURSTS):
        outcomes = burst([fire] * size)
        seen.update((o.code, o.reason) for o in outcomes)
        failed += [o for o in outcomes if o.code != C.OK]
        if seen[(C.OK, "")] and any(o.code == C.RESOURCE_EXHAUSTED for o in failed):
            break
    return seen, failed


def assert_serving(channel: grpc.Channel, service: str) -> None:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_the_ranker_sheds_load_beyond_its_limit_and_recovers(overload):
    procs, channels, _ = overload
    stub = ranker_pb2_grpc.RankerServiceStub(channels["ranker"])
    before = codes_seen(scrape(_metrics_url(procs["ranker"])), "ranker", RECOMMEND)
    request = ranker_pb2.RecommendFromFavouritesRequest(liked_ids=[1, 20], options=S.RecommendOptions(limit=10))

    seen, _ = bursts_until_both(
        lambda: stub.RecommendFromFavourites.future(request, timeout=60), scaled(4 * RANKER_LIMIT)
    )
    print(f"\nranker burst outcomes: {dict(seen)}")
    assert set(seen) <= {(C.OK, ""), (C.RESOURCE_EXHAUSTED, "")}, seen
    shed, ok = seen[(C.RESOURCE_EXHAUSTED, "")], seen[(C.OK, "")]
    assert shed and ok

    # shed calls never reached a handler: the ranker counted exactly the accepted ones
    after = codes_seen(scrape(_metrics_url(procs["ranker"])), "ranker", RECOMMEND)
    assert {c: n - before.get(c, 0) for c, n in after.items() if n - before.get(c, 0)} == {"OK": ok}

    assert_serving(channels["ranker"], "anime2vec.v1.RankerService")
    for _ in range(5):  # one at a time: all accepted
        assert len(stub.RecommendFromFavourites(request, timeout=60).recommendations) == 10


def test_the_gateway_sheds_load_beyond_its_limit_and_recovers(overload):
    procs, channels, _ = overload
    gateway = gateway_pb2_grpc.GatewayServiceStub(channels["small-gateway"])
    url = _metrics_url(procs["small-gateway"])
    before = codes_seen(scrape(url), "gateway", GW_RECOMMEND)
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto"), S.AnimeRef(title="Death Note")])

    seen, _ = bursts_until_both(
        lambda: gateway.Recommend.future(request, metadata=AUTH, timeout=60), scaled(4 * GATEWAY_LIMIT)
    )
    print(f"\ngateway burst outcomes: {dict(seen)}")
    # the gateway's own limit (grpc's maximum_concurrent_rpcs) sheds without details; the ranker
    # behind it has the default limit and sheds nothing
    assert set(seen) <= {(C.OK, ""), (C.RESOURCE_EXHAUSTED, "")}, seen
    ok = seen[(C.OK, "")]
    assert ok and seen[(C.RESOURCE_EXHAUSTED, "")]
    after = codes_seen(scrape(url), "gateway", GW_RECOMMEND)
    assert {c: n - before.get(c, 0) for c, n in after.items() if n - before.get(c, 0)} == {"OK": ok}

    assert_serving(channels["small-gateway"], "anime2vec.v1.GatewayService")
    assert len(gateway.Recommend(request, metadata=AUTH, timeout=60).recommendations) == 10
    assert gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(title="Naruto")), metadata=AUTH, timeout=60
    ).recommendations
    assert gateway.SearchText(
        gateway_pb2.SearchTextRequest(query="ninjas protect their village"), metadata=AUTH, timeout=60
    ).recommendations
    assert (
        gateway.ResolveTitles(gateway_pb2.ResolveTitlesRequest(query="Naruto"), metadata=AUTH, timeout=60)
        .candidates[0]
        .anime_id
        == 20
    )


def test_the_gateway_relays_ranker_shedding_as_resource_exhausted_without_retrying(overload):
    procs, channels, proxy = overload
    gateway = gateway_pb2_grpc.GatewayServiceStub(channels["gateway-over-proxy"])
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Cowboy Bebop")])
    attempts_before = proxy.attempts("RecommendFromFavourites")
    shed_before = proxy.attempts("RecommendFromFavourites", "RESOURCE_EXHAUSTED")

    seen, errors = bursts_until_both(lambda: gateway.Recommend.future(request, metadata=AUTH, timeout=60), scaled(16))
    print(f"\ngateway-over-limited-ranker burst outcomes: {dict(seen)}")
    assert set(seen) <= {(C.OK, ""), (C.RESOURCE_EXHAUSTED, "RANKER_OVERLOADED")}, seen
    shed = seen[(C.RESOURCE_EXHAUSTED, "RANKER_OVERLOADED")]
    assert shed and seen[(C.OK, "")]
    assert all(e.retry_after_s and "concurrency limit" in e.message for e in errors), errors[:3]

    # one ranker attempt per gateway call, shed or not: RESOURCE_EXHAUSTED is not retried
    calls = sum(seen.values())
    assert proxy.attempts("RecommendFromFavourites") - attempts_before == calls
    assert proxy.attempts("RecommendFromFavourites", "RESOURCE_EXHAUSTED") - shed_before == shed

    # ... while UNAVAILABLE is (gRPC retry policy, 3 attempts): the count above would have shown retries
    before = proxy.attempts("RecommendFromFavourites")
    proxy.inject = (C.UNAVAILABLE, "injected outage")
    try:
        with pytest.raises(grpc.RpcError) as info:
            gateway.Recommend(request, metadata=AUTH, timeout=60)
    finally:
        proxy.inject = None
    err = ErrorDetails.from_rpc_error(info.value)
    assert (err.code, err.reason) == (C.UNAVAILABLE, "RANKER_UNAVAILABLE")
    assert proxy.attempts("RecommendFromFavourites") - before == 3

    assert_serving(channels["gateway-over-proxy"], "anime2vec.v1.GatewayService")
    assert len(gateway.Recommend(request, metadata=AUTH, timeout=60).recommendations) == 10

"""Callers must not choose the gateway's metric labels (issue 14, item 3): calls to made-up method
paths, with or without a key, are counted under the one label "unknown", so the number of series in
/metrics stays the same however many different paths are sent."""

from __future__ import annotations

import re
from collections import Counter

import grpc
import pytest

from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import READER, auth, series, start_gateway

C = grpc.StatusCode
N = 300
SERVED = {
    f"anime2vec.v1.GatewayService/{m.name}" for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods
} | {"grpc.health.v1.Health/Check"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(tmp_path_factory.mktemp("labels"))
    yield gw
    stop()


def call(channel: grpc.Channel, path: str, metadata=()) -> grpc.StatusCode:
    try:
        channel.unary_unary(path)(b"", metadata=metadata, timeout=30)
        return C.OK
    except grpc.RpcError as e:
        return e.code()


def method_labels(body: str) -> set[str]:
    return {m for line in series(body, "a2v_rpc_") for m in re.findall(r'method="([^"]*)"', line)}


def test_made_up_methods_do_not_mint_series(gateway):
    channel = gateway.own_channel()
    call(channel, f"/x0/{'y' * 2000}")  # the "unknown" series now exist
    call(channel, "/anime2vec.v1.GatewayService/Nope", auth(READER))
    before = gateway.metrics()
    codes: Counter = Counter()
    for i in range(N):
        codes[call(channel, f"/x{i}/{'y' * 2000}")] += 1  # no key
        codes[call(channel, f"/anime2vec.v1.GatewayService/Nope{i}")] += 1  # no key, known service
        codes[call(channel, f"/anime2vec.v1.GatewayService/Nope{i}x", auth(READER))] += 1  # a valid key
    assert codes == Counter({C.UNAUTHENTICATED: 2 * N, C.UNIMPLEMENTED: N})
    after = gateway.metrics()
    n_before, n_after = len(series(before)), len(series(after))
    print(f"\n/metrics: {n_before} → {n_after} series, {len(before):,} → {len(after):,} bytes")
    assert n_after == n_before, f"made-up method paths added {n_after - n_before} series to /metrics"
    assert len(after) < len(before) + 1000  # counts changed, nothing grew with the paths
    assert method_labels(after) <= SERVED | {"unknown"}
    assert 'method="unknown"' in after


def test_a_served_method_keeps_its_own_label(gateway):
    with pytest.raises(grpc.RpcError):
        gateway.stub.ResolveTitles(gateway_pb2.ResolveTitlesRequest(query="Naruto"), timeout=30)  # no key
    gateway.stub.ResolveTitles(gateway_pb2.ResolveTitlesRequest(query="Naruto"), metadata=auth(READER), timeout=30)
    body = gateway.metrics()
    for code in ("UNAUTHENTICATED", "OK"):
        assert (
            f'a2v_rpc_requests_total{{code="{code}",method="anime2vec.v1.GatewayService/ResolveTitles",'
            f'service="gateway"}}'
        ) in body

"""Request limits are defined once (anime2vec/serving/limits.py): the ranker reports the ones it runs
with in GetModelInfoResponse.limits and a real gateway process checks callers against them, so raising
A2V_RANKER_MAX_LIMIT is one setting, not one per service."""

from __future__ import annotations

import grpc
import pytest

from anime2vec.serving.limits import DEFAULTS, RequestLimits
from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import READER, S, auth, start_gateway

RANKER = S.RequestLimits(max_limit=200, default_limit=10, max_ids=500, max_feedback_events=2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(tmp_path_factory.mktemp("limits"), ranker_limits=RANKER)
    yield gw
    stop()


def recommend(gw, limit: int):
    return gw.stub.Recommend(
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=20)], options=S.RecommendOptions(limit=limit)),
        metadata=auth(READER),
        timeout=30,
    )


def test_the_gateway_follows_the_limits_the_ranker_reports(gateway):
    assert DEFAULTS.max_limit < 150 < RANKER.max_limit
    assert recommend(gateway, 150).recommendations  # past the shared default, within the ranker's: relayed
    with pytest.raises(grpc.RpcError) as e:
        recommend(gateway, 201)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 200, got 201" in e.value.details()

    events = [
        gateway_pb2.FeedbackEvent(
            event_id=f"e-{i}", user_id=7, anime=S.AnimeRef(anime_id=20), kind=S.FEEDBACK_KIND_RATED, score=8
        )
        for i in range(3)
    ]
    with pytest.raises(grpc.RpcError) as e:  # the ranker's 2, lower than the gateway's own 500
        gateway.stub.RecordFeedback(gateway_pb2.RecordFeedbackRequest(events=events), metadata=auth(READER), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 2 events" in e.value.details()

    info = gateway.stub.GetModelInfo(S.GetModelInfoRequest(), metadata=auth(READER), timeout=30)
    assert RequestLimits.from_proto(info.limits) == RequestLimits.from_proto(RANKER)


def test_a_ranker_that_reports_no_limits_keeps_the_shared_defaults():
    assert RequestLimits.from_proto(S.RequestLimits()) == DEFAULTS
    assert RequestLimits.from_proto(S.RequestLimits(max_limit=300)).max_limit == 300
    assert RequestLimits.from_proto(DEFAULTS.to_proto()) == DEFAULTS

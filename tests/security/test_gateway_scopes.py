"""API keys with scopes over a real socket (issue 14, item 4, the gateway's part): a key may only do
what its scopes allow, so an application key cannot overwrite an existing anime's title and text,
and an id the gateway passes to the ranker is a sane one.

Keys (tests/security/gateway_stack.py): READER is bare (read + feedback), READ_ONLY has `read`,
ADMIN has `read+feedback+catalog`. Unfixed, every configured key could do everything (and the
scoped entries were not keys at all).
"""

from __future__ import annotations

import grpc
import pytest

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import ADMIN, READ_ONLY, READER, S, auth, start_gateway

C = grpc.StatusCode
NARUTO = S.AnimeInput(title="Naruto (defaced)", synopsis="Overwritten by an application that only reads.")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(tmp_path_factory.mktemp("scopes"))
    yield gw
    stop()


def outcome(call, request, key: str) -> ErrorDetails | None:
    try:
        call(request, metadata=auth(key), timeout=30)
        return None
    except grpc.RpcError as e:
        return ErrorDetails.from_rpc_error(e)


def recommend(gw, key: str):
    return outcome(gw.stub.Recommend, gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")]), key)


def feedback(gw, key: str):
    event = gateway_pb2.FeedbackEvent(
        event_id="e-1", user_id=10**13, anime=S.AnimeRef(anime_id=20), kind=S.FEEDBACK_KIND_COMPLETED
    )
    return outcome(gw.stub.RecordFeedback, gateway_pb2.RecordFeedbackRequest(events=[event]), key)


def overwrite(gw, key: str, anime_id: int = 20):
    return outcome(gw.stub.AddAnime, gateway_pb2.AddAnimeRequest(anime_id=anime_id, anime=NARUTO), key)


def test_a_bare_key_reads_and_records_feedback_but_cannot_overwrite_an_anime(gateway):
    assert recommend(gateway, READER) is None and feedback(gateway, READER) is None
    denied = overwrite(gateway, READER)
    assert denied is not None and (denied.code, denied.reason) == (C.PERMISSION_DENIED, "API_KEY_SCOPE")
    assert denied.metadata == {"method": "AddAnime", "required_scope": "catalog"}
    added = outcome(gateway.stub.AddAnime, gateway_pb2.AddAnimeRequest(anime=NARUTO), READER)  # a new one neither
    assert added is not None and added.code == C.PERMISSION_DENIED
    assert gateway.ranker.upserts == []  # nothing reached the ranker


def test_a_read_only_key_only_reads(gateway):
    assert recommend(gateway, READ_ONLY) is None
    denied = feedback(gateway, READ_ONLY)
    assert (denied.code, denied.reason, denied.metadata["required_scope"]) == (
        C.PERMISSION_DENIED,
        "API_KEY_SCOPE",
        "feedback",
    )


def test_a_catalog_key_overwrites(gateway):
    assert overwrite(gateway, ADMIN) is None
    assert [(u.anime_id, u.anime.title) for u in gateway.ranker.upserts] == [(20, NARUTO.title)]
    # the ranker replaces a catalogue anime only when told so: the gateway says it for catalog keys
    assert gateway.ranker.upsert_metadata[-1].get("a2v-replace-catalogue-anime") == "20"
    assert "authorization" not in gateway.ranker.upsert_metadata[-1]


@pytest.mark.parametrize("anime_id", [2**63 - 1, 2**31, 0, -1, -(2**63)])
def test_an_insane_id_never_reaches_the_ranker(gateway, anime_id):
    n = len(gateway.ranker.upserts)
    error = overwrite(gateway, ADMIN, anime_id)
    assert error is not None and error.code == C.INVALID_ARGUMENT
    assert "1..2147483647" in error.field_violations["anime_id"]
    assert len(gateway.ranker.upserts) == n


@pytest.mark.parametrize("anime_id", [2**63 - 1, 2**31, -7])
def test_an_insane_favourite_id_is_invalid_argument(gateway, anime_id):
    error = outcome(
        gateway.stub.Recommend, gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=anime_id)]), READER
    )
    assert error.code == C.INVALID_ARGUMENT and "favourites[0].anime_id" in error.field_violations


def test_unknown_keys_and_missing_keys_keep_their_statuses(gateway):
    assert (recommend(gateway, "not-a-key").code, recommend(gateway, "not-a-key").reason) == (
        C.PERMISSION_DENIED,
        "API_KEY_INVALID",
    )
    # the scope suffix is configuration, not part of the key a caller presents
    assert recommend(gateway, f"{ADMIN}:read+feedback+catalog").reason == "API_KEY_INVALID"
    missing = outcome(gateway.stub.Recommend, gateway_pb2.RecommendRequest(), "")
    assert missing.code == C.UNAUTHENTICATED

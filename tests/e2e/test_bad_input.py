"""Bad input and bad credentials over real sockets: each gets its precise status and the fields at
fault, and the gateway keeps answering afterwards."""

from __future__ import annotations

import gzip

import grpc
import pytest

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import API_KEYS, AUTH, Stack

S = common_pb2
MB = 1024 * 1024
C = grpc.StatusCode


def fav(*titles, **options) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(
        favourites=[S.AnimeRef(title=t) for t in titles], options=S.RecommendOptions(**options)
    )


def failure(call, request, metadata=AUTH) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=metadata, timeout=30)
    return ErrorDetails.from_rpc_error(info.value)


def assert_still_answers(stack: Stack) -> None:
    resp = stack.gateway.Recommend(fav("Naruto", limit=3), metadata=AUTH, timeout=30)
    assert len(resp.recommendations) == 3


# (rpc, request, status, {field: a word its description must contain})
CASES = {
    "no favourites": ("Recommend", gateway_pb2.RecommendRequest(), C.INVALID_ARGUMENT, {"favourites": "at least one"}),
    "empty ref": (
        "Recommend",
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef()]),
        C.INVALID_ARGUMENT,
        {"favourites[0]": "anime_id or title"},
    ),
    "negative id": (
        "Recommend",
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=-5)]),
        C.INVALID_ARGUMENT,
        {"favourites[0].anime_id": "1..2147483647"},
    ),
    "unknown id": (
        "Recommend",
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto"), S.AnimeRef(anime_id=987654321)]),
        C.NOT_FOUND,
        {"favourites[1].anime_id": "not found"},
    ),
    "too many favourites": (
        "Recommend",
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=20)] * 101),
        C.INVALID_ARGUMENT,
        {"favourites": "at most 100"},
    ),
    "limit negative": ("Recommend", fav("Naruto", limit=-1), C.INVALID_ARGUMENT, {"options.limit": ">= 0"}),
    "limit huge": ("Recommend", fav("Naruto", limit=10**9), C.INVALID_ARGUMENT, {"options.limit": "at most 100"}),
    "diversity": ("Recommend", fav("Naruto", diversity=1.5), C.INVALID_ARGUMENT, {"options.diversity": "[0, 1]"}),
    "garbage page token": (
        "Recommend",
        fav("Naruto", page_token="not-a-token!!"),
        C.INVALID_ARGUMENT,
        {"options.page_token": "page token"},
    ),
    "bad year filter": (
        "Recommend",
        fav("Naruto", filters=S.Filters(year_min=2020, year_max=2010)),
        C.INVALID_ARGUMENT,
        {"options.filters.year_min": "after year_max"},
    ),
    "megabyte title": ("Recommend", fav("x" * MB), C.INVALID_ARGUMENT, {"favourites[0].title": "at most 256"}),
    "title of punctuation": ("Recommend", fav("?!?"), C.INVALID_ARGUMENT, {"favourites[0].title": "no letters"}),
    "disliked favourite": (
        "Recommend",
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")], disliked=[S.AnimeRef(anime_id=20)]),
        C.INVALID_ARGUMENT,
        {"disliked[0].anime_id": "also a favourite (favourites[0].title)"},
    ),
    "several problems at once": (
        "Recommend",
        gateway_pb2.RecommendRequest(
            favourites=[
                S.AnimeRef(title=" "),
                S.AnimeRef(title="Naruto"),
                S.AnimeRef(title="y" * 300),
                S.AnimeRef(title="Zzqxj Wvkpt Frobnic"),
            ],
            options=S.RecommendOptions(limit=-3),
        ),
        C.INVALID_ARGUMENT,
        {
            "favourites[0].title": "blank",
            "favourites[2].title": "at most 256",
            "favourites[3].title": "no anime matches",
            "options.limit": ">= 0",
        },
    ),
    "blank query": ("SearchText", gateway_pb2.SearchTextRequest(query="   "), C.INVALID_ARGUMENT, {"query": "blank"}),
    "megabyte query": (
        "SearchText",
        gateway_pb2.SearchTextRequest(query="pirates " * (MB // 8)),
        C.INVALID_ARGUMENT,
        {"query": "at most 2000"},
    ),
    "similar without anime": ("Similar", gateway_pb2.SimilarRequest(), C.INVALID_ARGUMENT, {"anime": "anime_id"}),
    "unknown user": ("RecommendForUser", S.RecommendForUserRequest(user_id=42), C.NOT_FOUND, {"user_id": "not found"}),
    "malformed xml": (
        "ImportMalList",
        gateway_pb2.ImportMalListRequest(mal_xml=b"<myanimelist><anime>"),
        C.INVALID_ARGUMENT,
        {"mal_xml": "malformed XML"},
    ),
    "not a mal export": (
        "ImportMalList",
        gateway_pb2.ImportMalListRequest(mal_xml=b"<html><body/></html>"),
        C.INVALID_ARGUMENT,
        {"mal_xml": "not a MyAnimeList export"},
    ),
    "xml with a dtd": (
        "ImportMalList",
        gateway_pb2.ImportMalListRequest(mal_xml=b'<!DOCTYPE x [<!ENTITY a "aaaa">]><myanimelist>&a;</myanimelist>'),
        C.INVALID_ARGUMENT,
        {"mal_xml": "DTD"},
    ),
    "mal list without favourites": (
        "ImportMalList",
        gateway_pb2.ImportMalListRequest(
            mal_xml=(
                b"<myanimelist><anime><series_animedb_id>20</series_animedb_id><my_score>2</my_score>"
                b"<my_status>Completed</my_status></anime></myanimelist>"
            )
        ),
        C.INVALID_ARGUMENT,
        {"mal_xml": "no usable favourite"},
    ),
    "empty upload": ("ImportMalList", gateway_pb2.ImportMalListRequest(), C.INVALID_ARGUMENT, {"mal_xml": "empty"}),
    "min score": (
        "ImportMalList",
        gateway_pb2.ImportMalListRequest(mal_xml=b"<myanimelist/>", min_score=11),
        C.INVALID_ARGUMENT,
        {"min_score": "1..10"},
    ),
    "add anime without synopsis": (
        "AddAnime",
        gateway_pb2.AddAnimeRequest(anime=S.AnimeInput(title="Nameless")),
        C.INVALID_ARGUMENT,
        {"anime.synopsis": "required"},
    ),
    "autocomplete limit": (
        "ResolveTitles",
        gateway_pb2.ResolveTitlesRequest(query="naru", limit=51),
        C.INVALID_ARGUMENT,
        {"limit": "1..50"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_its_precise_status(stack: Stack, case: str):
    rpc, request, code, fields = CASES[case]
    err = failure(getattr(stack.gateway, rpc), request)
    assert err.code == code, err.message
    for field, word in fields.items():
        assert word in err.field_violations.get(field, ""), (field, err.field_violations)
    assert set(err.field_violations) == set(fields)
    assert_still_answers(stack)


def test_unknown_title_is_not_found_with_suggestions(stack: Stack):
    err = failure(stack.gateway.Recommend, fav("Naruto", "Narutoo Shipuden Movie 9"))
    assert err.code == C.NOT_FOUND and err.reason == "ANIME_NOT_FOUND"
    assert err.resource_type == "anime" and err.resource_name == "Narutoo Shipuden Movie 9"
    assert list(err.field_violations) == ["favourites[1].title"]
    assert err.suggestions and all("Naruto" in s for s in err.suggestions)
    assert err.suggestions[0] in err.message
    assert_still_answers(stack)


def test_limit_zero_means_the_default_of_ten(stack: Stack):
    assert len(stack.gateway.Recommend(fav("Naruto", limit=0), metadata=AUTH, timeout=30).recommendations) == 10


def test_page_token_of_another_query_is_rejected(stack: Stack):
    token = stack.gateway.Recommend(fav("Naruto", limit=5), metadata=AUTH, timeout=30).next_page_token
    err = failure(stack.gateway.Recommend, fav("Bleach", limit=5, page_token=token))
    assert err.code == C.INVALID_ARGUMENT and "different request" in err.field_violations["options.page_token"]


def test_invalid_utf8_is_invalid_argument(stack: Stack):
    # RecommendRequest{favourites: [AnimeRef{title: b"\xff\xfe"}]} written by hand: field 1 (LEN) holding
    # field 2 (LEN); protobuf refuses to serialise such a string, so the bytes go through a generic call.
    raw = bytes([0x0A, 4, 0x12, 2, 0xFF, 0xFE])
    call = stack.channel.unary_unary("/anime2vec.v1.GatewayService/Recommend")
    with pytest.raises(grpc.RpcError) as info:
        call(raw, metadata=AUTH, timeout=30)
    assert info.value.code() == C.INVALID_ARGUMENT
    assert "request" in ErrorDetails.from_rpc_error(info.value).field_violations
    assert_still_answers(stack)


def test_oversized_uploads_are_resource_exhausted(stack: Stack):
    big = b"<myanimelist>" + b" " * (5 * MB) + b"</myanimelist>"  # over the 4 MiB XML limit
    err = failure(stack.gateway.ImportMalList, gateway_pb2.ImportMalListRequest(mal_xml=big))
    assert err.code == C.RESOURCE_EXHAUSTED and err.reason == "MAL_XML_TOO_LARGE"
    bomb = gzip.compress(big)  # ~5 KB that inflates to 5 MB
    assert len(bomb) < 64 * 1024
    err = failure(stack.gateway.ImportMalList, gateway_pb2.ImportMalListRequest(mal_xml=bomb))
    assert err.code == C.RESOURCE_EXHAUSTED and err.reason == "MAL_XML_TOO_LARGE"
    huge = gateway_pb2.ImportMalListRequest(mal_xml=b"x" * (9 * MB))  # over the 8 MiB message limit
    assert failure(stack.gateway.ImportMalList, huge).code == C.RESOURCE_EXHAUSTED
    assert_still_answers(stack)


@pytest.mark.parametrize(
    "metadata, code, reason",
    [
        ([], C.UNAUTHENTICATED, "API_KEY_MISSING"),
        ([("authorization", "Basic ZTJlOmUyZQ==")], C.UNAUTHENTICATED, "API_KEY_MALFORMED"),
        ([("authorization", "Bearer")], C.UNAUTHENTICATED, "API_KEY_MALFORMED"),
        ([("authorization", "Bearer e2e-key-1x")], C.PERMISSION_DENIED, "API_KEY_INVALID"),
        ([("authorization", "Bearer e2e-key")], C.PERMISSION_DENIED, "API_KEY_INVALID"),
    ],
    ids=["missing", "basic", "no key", "longer key", "prefix of a key"],
)
def test_every_rpc_needs_a_configured_key(stack: Stack, metadata, code, reason):
    for rpc, request in (
        ("Recommend", fav("Naruto")),
        ("GetModelInfo", S.GetModelInfoRequest()),
        ("ImportMalList", gateway_pb2.ImportMalListRequest()),
    ):
        err = failure(getattr(stack.gateway, rpc), request, metadata=metadata)
        assert (err.code, err.reason) == (code, reason)
        assert "e2e-key" not in err.message  # keys are never echoed
    assert_still_answers(stack)


def test_any_configured_key_works_and_the_scheme_is_case_insensitive(stack: Stack):
    for header in (f"Bearer {API_KEYS[1]}", f"bearer {API_KEYS[0]}"):
        resp = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=[("authorization", header)], timeout=30)
        assert resp.model.version == stack.bundle.name


def test_keys_and_bodies_never_reach_the_logs(stack: Stack):
    secret_title = "Secret Title Nobody Should Log"
    failure(stack.gateway.Recommend, fav(secret_title), metadata=[("authorization", "Bearer wrong-key-123")])
    failure(stack.gateway.Recommend, fav(secret_title))
    log = stack.procs["gateway"].log_path.read_text()
    assert "wrong-key-123" not in log and API_KEYS[0] not in log and secret_title not in log
    assert '"code": "PERMISSION_DENIED"' in log and '"code": "NOT_FOUND"' in log

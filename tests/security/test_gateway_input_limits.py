"""What the gateway passes on, and what it tells callers, over a real socket (issue 14, item 7, the
gateway's part).

- Text sizes are checked at the gateway: a 7 MB synopsis (under the gateway's 8 MiB message limit,
  over the ranker's 4 MiB) is INVALID_ARGUMENT naming `anime.synopsis`, not the ranker's transport
  error; negative `episodes` is INVALID_ARGUMENT too.
- Fields the gateway does not know are not passed on: megabytes of unknown fields inside a message
  the gateway forwards do not reach the ranker.
- Outage errors never show callers an internal host:port (the encoder's, the ranker's, or one the
  ranker quotes); the gateway's log has them.
"""

from __future__ import annotations

import grpc
import pytest

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import ADMIN, READER, S, auth, start_gateway

C = grpc.StatusCode
MB = 1_000_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(tmp_path_factory.mktemp("limits"))
    yield gw
    stop()


def add(gw, anime: S.AnimeInput) -> ErrorDetails | None:
    try:
        gw.stub.AddAnime(gateway_pb2.AddAnimeRequest(anime=anime), metadata=auth(ADMIN), timeout=60)
        return None
    except grpc.RpcError as e:
        return ErrorDetails.from_rpc_error(e)


@pytest.mark.parametrize(
    "anime, field",
    [
        (S.AnimeInput(title="Big", synopsis="x" * (7 * MB)), "anime.synopsis"),
        (S.AnimeInput(title="Big", synopsis="x" * 20_001), "anime.synopsis"),
        (S.AnimeInput(title="T" * 257, synopsis="A story."), "anime.title"),
        (S.AnimeInput(title="Big", title_english="E" * (5 * MB), synopsis="A story."), "anime.title_english"),
        (S.AnimeInput(title="Big", synonyms=["s" * 300], synopsis="A story."), "anime.synonyms[0]"),
        (S.AnimeInput(title="Big", synonyms=["s"] * 51, synopsis="A story."), "anime.synonyms"),
        (S.AnimeInput(title="Big", genres=["g" * 51], synopsis="A story."), "anime.genres[0]"),
        (S.AnimeInput(title="Big", type="T" * (5 * MB), synopsis="A story."), "anime.type"),
        (S.AnimeInput(title="Negative", synopsis="A story.", episodes=-1), "anime.episodes"),
        (S.AnimeInput(title="Endless", synopsis="A story.", episodes=10_001), "anime.episodes"),
        (S.AnimeInput(title="Negative", synopsis="A story.", members=-5), "anime.members"),
    ],
)
def test_bad_anime_input_is_invalid_argument_naming_the_field(gateway, anime, field):
    n = len(gateway.ranker.upserts)
    error = add(gateway, anime)
    assert error is not None and error.code == C.INVALID_ARGUMENT, error
    assert field in error.field_violations, error.field_violations
    assert len(gateway.ranker.upserts) == n


def test_the_largest_legal_anime_is_added(gateway):
    anime = S.AnimeInput(
        title="T" * 256, synopsis="s" * 20_000, synonyms=["y" * 256] * 50, genres=["g" * 50] * 30, episodes=0
    )
    assert add(gateway, anime) is None
    assert gateway.ranker.upserts[-1].anime.synopsis == anime.synopsis


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_unknown_fields_are_not_passed_on(gateway):
    padding = _field(1000, b"p" * (5 * MB))  # a field number no message has
    anime = S.AnimeInput(title="Padded", synopsis="A story with megabytes of padding.").SerializeToString()
    body = _field(2, anime + padding)  # AddAnimeRequest.anime, with the padding inside it
    call = gateway.channel.unary_unary(
        "/anime2vec.v1.GatewayService/AddAnime", response_deserializer=gateway_pb2.AddAnimeResponse.FromString
    )
    assert call(body, metadata=auth(ADMIN), timeout=60).anime_id > 0
    forwarded = gateway.ranker.upserts[-1]
    assert forwarded.anime.title == "Padded" and len(forwarded.SerializeToString()) < 1_000

    options = S.RecommendOptions(limit=2).SerializeToString() + padding
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")]).SerializeToString()
    recommend = gateway.channel.unary_unary(
        "/anime2vec.v1.GatewayService/Recommend", response_deserializer=gateway_pb2.RecommendResponse.FromString
    )
    assert recommend(request + _field(3, options), metadata=auth(READER), timeout=60).recommendations


def assert_no_address(error: ErrorDetails, *addresses: str) -> None:
    text = " ".join([error.message, *error.field_violations.values(), *error.metadata.values()])
    for address in addresses:
        host, port = address.rsplit(":", 1)
        assert host not in text and port not in text, text


def test_an_encoder_outage_does_not_show_its_address(gateway):
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.SearchText(
            gateway_pb2.SearchTextRequest(query="pirates at sea"), metadata=auth(READER), timeout=30
        )
    error = ErrorDetails.from_rpc_error(e.value)
    assert (error.code, error.reason) == (C.UNAVAILABLE, "ENCODER_UNAVAILABLE") and error.retry_after_s
    assert "free-text search needs the encoder" in error.message
    assert_no_address(error, gateway.encoder_address)
    assert gateway.encoder_address in gateway.log()  # the operator still has it


def test_an_address_the_ranker_quotes_is_not_relayed(gateway):
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=gateway.ranker.ENCODER_DOWN_ID)])
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Recommend(request, metadata=auth(READER), timeout=30)
    error = ErrorDetails.from_rpc_error(e.value)
    assert (error.code, error.reason) == (C.UNAVAILABLE, "ENCODER_UNAVAILABLE") and error.retry_after_s
    assert_no_address(error, gateway.ranker.ENCODER_ADDRESS)


def test_a_ranker_outage_does_not_show_its_address(gateway):
    """Last in this module: it stops the ranker."""
    gateway.ranker_server.stop(None).wait()
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Recommend(
            gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(title="Naruto")]), metadata=auth(READER), timeout=30
        )
    error = ErrorDetails.from_rpc_error(e.value)
    assert (error.code, error.reason) == (C.UNAVAILABLE, "RANKER_UNAVAILABLE") and error.retry_after_s
    assert_no_address(error, gateway.ranker_address)

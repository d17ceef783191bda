"""Hostile callers of the ranker, over a real socket to a real ranker process (issue 14, items 4 and 7).

- Id poisoning: `UpsertAnime(anime_id=2**63-1)` was accepted, after which every UpsertAnime without
  an id failed with INTERNAL (MAX(id) + 1 overflowed SQLite), restarts included. Ids are now
  bounded to 1..2**31-1 (INVALID_ARGUMENT naming `anime_id`), new ids come from a range callers
  cannot create ids in, and a store an earlier version let poison heals.
- Overwriting a catalogue anime by sending its id is refused (ALREADY_EXISTS, reason
  CATALOGUE_ANIME) unless the call says so explicitly (metadata a2v-replace-catalogue-anime).
- Values that make a ranking meaningless: negative episodes, content vectors far from the
  encoder's unit length (1e-30 or 1e30 per coordinate), liked weights of 1e-30 or 1e30.
"""

from __future__ import annotations

import math
import sqlite3

import grpc
import numpy as np
import pytest

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import common_pb2, ranker_pb2
from tests.faults.ranker_harness import Ranker, session_bundle_and_encoder

S = common_pb2
C = grpc.StatusCode
TIMEOUT_S = 60
ASSIGNED_FROM = 100_000_000
REPLACE_CATALOGUE = "a2v-replace-catalogue-anime"


def anime(title: str, **extra) -> S.AnimeInput:
    return S.AnimeInput(
        title=title,
        synopsis=f"{title}: a crew of pirates sails the sea for buried treasure.",
        genres=["Adventure"],
        type="TV",
        **extra,
    )


def refused(call, request, code: grpc.StatusCode, field: str, metadata=()) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=TIMEOUT_S, metadata=metadata)
    details = ErrorDetails.from_rpc_error(err.value)
    assert details.code == code, (details.code, details.message)
    assert field in details.field_violations, (field, details.field_violations, details.message)
    return details


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    return session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)


@pytest.fixture(scope="module")
def ranker(tiny, tmp_path_factory):
    bundle, encoder = tiny
    r = Ranker(tmp_path_factory.mktemp("hostile-ranker"), bundle, encoder)
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def catalogue(ranker) -> dict[int, str]:
    page = ranker.stub().ListCatalog(ranker_pb2.ListCatalogRequest(page_size=5000), timeout=TIMEOUT_S)
    return {e.anime_id: e.title for e in page.entries}


def test_out_of_range_anime_ids_are_refused_and_never_break_later_adds(ranker, catalogue):
    stub = ranker.stub()
    for bad in (2**63 - 1, 2**31, 0, -1, -(2**63)):
        refused(
            stub.UpsertAnime,
            ranker_pb2.UpsertAnimeRequest(anime_id=bad, anime=anime(f"Id {bad}")),
            C.INVALID_ARGUMENT,
            "anime_id",
        )
    # the ranker's own range: a caller may not create ids there (they would collide with assigned ones)
    refused(
        stub.UpsertAnime,
        ranker_pb2.UpsertAnimeRequest(anime_id=ASSIGNED_FROM + 12345, anime=anime("Squatter")),
        C.INVALID_ARGUMENT,
        "anime_id",
    )
    first = stub.UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime=anime("First Corsairs")), timeout=TIMEOUT_S)
    second = stub.UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime=anime("Second Corsairs")), timeout=TIMEOUT_S)
    assert first.created and second.created
    assert ASSIGNED_FROM <= first.anime_id < second.anime_id <= 2**31 - 1
    # an assigned id can be replaced by id, and a free id below the range can be chosen by the caller
    again = stub.UpsertAnime(
        ranker_pb2.UpsertAnimeRequest(anime_id=first.anime_id, anime=anime("First Corsairs II")), timeout=TIMEOUT_S
    )
    assert (again.anime_id, again.created) == (first.anime_id, False)
    free = max(catalogue) + 1000
    chosen = stub.UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime_id=free, anime=anime("Chosen Id")), timeout=TIMEOUT_S)
    assert (chosen.anime_id, chosen.created) == (free, True)


def test_a_store_poisoned_by_a_huge_id_heals(tiny, tmp_path):
    """The state an earlier version left after accepting 2**63-1: the next add must still get an id
    (it got INTERNAL, for ever), and the poisoned anime stays served (it was acknowledged)."""
    bundle, encoder = tiny
    r = Ranker(tmp_path, bundle, encoder)
    r.start()
    try:
        added = r.stub().UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime=anime("Before The Poison")), timeout=TIMEOUT_S)
    finally:
        assert r.stop() == 0
    poison = 2**63 - 1
    with sqlite3.connect(r.data_dir / "added_anime.sqlite") as db:  # what the unbounded version stored
        db.execute(
            "INSERT INTO added_anime SELECT ?, replace(fields, 'Before The Poison', 'Poisoned'), raw_vector, "
            "encoder_fingerprint, updated_at FROM added_anime WHERE anime_id = ?",
            (poison, added.anime_id),
        )
    db.close()
    offset = r.log_size()
    r.start()
    try:
        stub = r.stub()
        nxt = stub.UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime=anime("After The Poison")), timeout=TIMEOUT_S)
        assert nxt.created and nxt.anime_id == added.anime_id + 1
        similar = stub.SimilarItems(ranker_pb2.SimilarItemsRequest(anime_id=poison), timeout=TIMEOUT_S)
        assert len(similar.recommendations) > 0
        warnings = [x["msg"] for x in r.log_records(offset) if x["level"] == "WARNING" and str(poison) in x["msg"]]
        assert len(warnings) == 1 and "still served" in warnings[0], warnings
    finally:
        assert r.stop() == 0


def test_a_catalogue_anime_is_replaced_only_when_asked_explicitly(ranker, catalogue):
    stub = ranker.stub()
    aid = min(catalogue)
    request = ranker_pb2.UpsertAnimeRequest(anime_id=aid, anime=anime("Vandalised Title"))
    details = refused(stub.UpsertAnime, request, C.ALREADY_EXISTS, "anime_id")
    assert details.reason == "CATALOGUE_ANIME" and REPLACE_CATALOGUE in details.message
    refused(stub.UpsertAnime, request, C.ALREADY_EXISTS, "anime_id", metadata=[(REPLACE_CATALOGUE, str(aid + 1))])

    def title() -> str:
        page = stub.ListCatalog(ranker_pb2.ListCatalogRequest(page_size=5000), timeout=TIMEOUT_S)
        return next(e.title for e in page.entries if e.anime_id == aid)

    assert title() == catalogue[aid]

    done = stub.UpsertAnime(
        ranker_pb2.UpsertAnimeRequest(anime_id=aid, anime=anime("Corrected Title")),
        timeout=TIMEOUT_S,
        metadata=[(REPLACE_CATALOGUE, str(aid))],
    )
    assert (done.anime_id, done.created) == (aid, False) and title() == "Corrected Title"


def test_negative_or_absurd_episode_counts_are_refused(ranker):
    for episodes in (-1, -(2**31), 2**31 - 1):
        refused(
            ranker.stub().UpsertAnime,
            ranker_pb2.UpsertAnimeRequest(anime=anime("Episodes", episodes=episodes)),
            C.INVALID_ARGUMENT,
            "anime.episodes",
        )


def unit(dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def test_content_vectors_the_encoder_cannot_have_made_are_refused(ranker, tiny):
    bundle, _ = tiny
    stub = ranker.stub()
    dim = stub.GetModelInfo(S.GetModelInfoRequest(), timeout=TIMEOUT_S).model.encoder_dim
    u = unit(dim)
    ok = stub.RecommendFromVector(ranker_pb2.RecommendFromVectorRequest(content_vector=u.tolist()), timeout=TIMEOUT_S)
    assert len(ok.recommendations) == 10 and any(r.score != 0.0 for r in ok.recommendations)
    for vector in (
        (u * 1e-30).tolist(),
        (u * 1e30).tolist(),
        [1e-45] * dim,
        [3e38] * dim,
        [math.nan] + u[1:].tolist(),
        [math.inf] + [0.0] * (dim - 1),
        [0.0] * dim,
        u[:-1].tolist(),
    ):
        refused(
            stub.RecommendFromVector,
            ranker_pb2.RecommendFromVectorRequest(content_vector=vector),
            C.INVALID_ARGUMENT,
            "content_vector",
        )


def test_liked_weights_that_zero_or_swamp_the_ranking_are_refused(ranker, catalogue):
    stub = ranker.stub()
    liked = sorted(catalogue)[:2]
    ok = stub.RecommendFromFavourites(
        ranker_pb2.RecommendFromFavouritesRequest(liked_ids=liked, liked_weights=[1.0, 4.5]), timeout=TIMEOUT_S
    )
    assert len(ok.recommendations) == 10 and any(r.score != 0.0 for r in ok.recommendations)
    for bad in (1e-30, 1e30, 0.0, -1.0, math.nan, math.inf):
        refused(
            stub.RecommendFromFavourites,
            ranker_pb2.RecommendFromFavouritesRequest(liked_ids=liked, liked_weights=[1.0, bad]),
            C.INVALID_ARGUMENT,
            "liked_weights[1]",
        )

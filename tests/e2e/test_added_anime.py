"""An anime added through the API is resolvable and recommendable at once, from its text alone, and
survives a restart of the ranker process."""

from __future__ import annotations

import urllib.request

from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import AUTH, Stack

S = common_pb2
PIRATES = S.AnimeInput(
    title="Saltwind Corsairs",
    title_english="Corsairs of the Salt Wind",
    synonyms=["Saltwind"],
    synopsis=(
        "A crew of young pirates sails the open sea on a battered wooden ship, hunting for a legendary "
        "buried treasure. They chart unknown islands, escape navy warships, duel rival pirate captains "
        "and ride out storms on the ocean, all for the gold of the last pirate king."
    ),
    genres=["Adventure", "Action"],
    type="TV",
    year=2024,
    episodes=24,
)
PIRATE_QUERY = "pirates sailing the sea in search of buried treasure"


def search(stack: Stack, query: str, **options) -> gateway_pb2.RecommendResponse:
    return stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(query=query, options=S.RecommendOptions(**options)), metadata=AUTH, timeout=30
    )


def test_added_anime_is_found_at_once_and_survives_a_ranker_restart(stack: Stack):
    n_before = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model.n_items
    added = stack.gateway.AddAnime(gateway_pb2.AddAnimeRequest(anime=PIRATES), metadata=AUTH, timeout=60)
    assert added.created and added.anime_id >= 100_000_000 and added.model_version == stack.bundle.name
    aid = added.anime_id

    # title resolution knows it immediately, by any of its names
    for name in ("Saltwind Corsairs", "corsairs of the salt wind", "Saltwind"):
        resp = stack.gateway.ResolveTitles(
            gateway_pb2.ResolveTitlesRequest(query=name, limit=3), metadata=AUTH, timeout=30
        )
        top = resp.candidates[0]
        assert (top.anime_id, top.title, top.type, top.year) == (aid, "Saltwind Corsairs", "TV", 2024)

    # recommendable from its text: a matching description ranks it in the top 10, as a cold-start item
    found = search(stack, PIRATE_QUERY, limit=10)
    assert aid in [r.anime_id for r in found.recommendations]
    rec = next(r for r in found.recommendations if r.anime_id == aid)
    assert rec.cold_start and rec.year == 2024 and list(rec.genres) == ["Adventure", "Action"]

    # the sample has no years: a year filter keeps exactly the anime added with one
    recent = search(stack, PIRATE_QUERY, limit=10, filters=S.Filters(year_min=2020))
    assert [r.anime_id for r in recent.recommendations] == [aid]

    # usable as a favourite by title, and the favourites query does not return it
    by_title = stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(
            favourites=[S.AnimeRef(title="Saltwind Corsairs")], options=S.RecommendOptions(limit=5)
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert by_title.favourites[0].anime_id == aid and aid not in [r.anime_id for r in by_title.recommendations]
    assert len(by_title.recommendations) == 5

    # SIGTERM the ranker, start it again on the same data directory: the anime is still there
    stack.stop("ranker")
    stack.start("ranker")
    stack.wait_answering()
    info = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model
    assert info.n_items == n_before + 1
    after = search(stack, PIRATE_QUERY + ".", limit=10)  # a new query text: not the gateway's cached vector
    assert aid in [r.anime_id for r in after.recommendations]
    similar = stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(anime_id=aid)), metadata=AUTH, timeout=30
    )
    assert similar.favourites[0].title == "Saltwind Corsairs" and len(similar.recommendations) == 10

    # replacing it by id keeps its id and says so
    replaced = stack.gateway.AddAnime(
        gateway_pb2.AddAnimeRequest(anime_id=aid, anime=PIRATES), metadata=AUTH, timeout=60
    )
    assert (replaced.anime_id, replaced.created) == (aid, False)

    body = urllib.request.urlopen(stack.metrics_url("ranker"), timeout=10).read().decode()
    assert (
        'a2v_rpc_requests_total{code="OK",method="anime2vec.v1.RankerService/UpsertAnime",service="ranker"} 1.0' in body
    )

"""Filters.cold_start_only over real sockets: only anime without interactions in the model's
training data (cold start or held out) come back, from every ranking RPC, an anime added a moment
before included; paging continues the same list; without the filter the list has warm anime."""

from __future__ import annotations

import json

from anime2vec import client
from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import API_KEYS, AUTH, Stack

S = common_pb2
NARUTO, BLEACH, BEBOP = 20, 269, 1
COLD = S.Filters(cold_start_only=True)
# No year (the sample has none, and a year would change what year filters elsewhere match) and a
# story no catalogue anime tells, so a query with its words finds it.
LIGHTHOUSE = S.AnimeInput(
    title="Lanternfall Lighthouse Mysteries",
    synopsis=(
        "On a foggy island, the retired lighthouse keeper Ilse and her talking grey cat solve small "
        "mysteries for the fishing village: a stolen lantern lens, a ghost ship seen in the fog, a "
        "message in a bottle. Each night the lighthouse beam reveals a new clue along the cliffs."
    ),
    genres=["Mystery", "Comedy"],
    type="TV",
    episodes=12,
)
LIGHTHOUSE_QUERY = "an old lighthouse keeper and her cat solve mysteries in a foggy fishing village"


def opts(**kw) -> S.RecommendOptions:
    return S.RecommendOptions(**kw)


def recommend(stack: Stack, *ids: int, **kw) -> gateway_pb2.RecommendResponse:
    return stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=a) for a in ids], options=opts(**kw)),
        metadata=AUTH,
        timeout=30,
    )


def for_user(stack: Stack, user_id: int, **kw) -> gateway_pb2.RecommendResponse:
    return stack.gateway.RecommendForUser(
        S.RecommendForUserRequest(user_id=user_id, options=opts(**kw)), metadata=AUTH, timeout=30
    )


def similar(stack: Stack, anime_id: int, **kw) -> gateway_pb2.RecommendResponse:
    return stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(anime_id=anime_id), options=opts(**kw)), metadata=AUTH, timeout=30
    )


def search(stack: Stack, query: str, **kw) -> gateway_pb2.RecommendResponse:
    return stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(query=query, options=opts(**kw)), metadata=AUTH, timeout=30
    )


def training_user(stack: Stack) -> int:
    info = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model
    assert info.example_user_ids, "the model names no training user"
    return int(info.example_user_ids[0])


def ids(resp) -> list[int]:
    return [r.anime_id for r in resp.recommendations]


def all_cold(resp) -> bool:
    return all(r.cold_start or r.held_out for r in resp.recommendations)


def test_every_ranking_rpc_returns_only_cold_anime_and_differs_from_the_unfiltered_list(stack: Stack):
    user = training_user(stack)
    calls = {
        "Recommend": lambda **kw: recommend(stack, NARUTO, BLEACH, **kw),
        "RecommendForUser": lambda **kw: for_user(stack, user, **kw),
        "Similar": lambda **kw: similar(stack, BEBOP, **kw),
        "SearchText": lambda **kw: search(stack, "a bounty hunter crew travels through space", **kw),
    }
    for name, call in calls.items():
        # 40: a free-text query's first 20 can all be cold or held out (its score is content alone)
        cold = call(limit=40, filters=COLD, explain=True)
        assert len(cold.recommendations) == 40, name
        assert all_cold(cold), (name, [(r.anime_id, r.cold_start, r.held_out) for r in cold.recommendations])
        assert not cold.served_by.degraded, (name, cold.served_by.degraded_reason)
        assert cold.served_by.strategy == S.STRATEGY_DROPOUTNET, name  # the served model ranked them
        scores = [r.score for r in cold.recommendations]
        assert scores == sorted(scores, reverse=True), name
        assert all(r.explanation for r in cold.recommendations), name
        plain = call(limit=40)
        assert any(not (r.cold_start or r.held_out) for r in plain.recommendations), name
        assert ids(plain) != ids(cold), name


def test_an_anime_added_a_moment_before_is_found_among_the_new_ones(stack: Stack):
    added = stack.gateway.AddAnime(gateway_pb2.AddAnimeRequest(anime=LIGHTHOUSE), metadata=AUTH, timeout=60)
    aid = added.anime_id
    found = search(stack, LIGHTHOUSE_QUERY, limit=10, filters=COLD)
    assert aid in ids(found) and all_cold(found)
    rec = next(r for r in found.recommendations if r.anime_id == aid)
    assert rec.cold_start and not rec.held_out and rec.title == LIGHTHOUSE.title
    # and as a favourite: what else is new for someone who likes it (never itself)
    liked = recommend(stack, aid, limit=10, filters=COLD)
    assert aid not in ids(liked) and len(liked.recommendations) == 10 and all_cold(liked)


def test_pages_continue_the_same_cold_list_without_duplicates(stack: Stack):
    user = training_user(stack)
    for call in (lambda **kw: for_user(stack, user, **kw), lambda **kw: recommend(stack, NARUTO, **kw)):
        whole = call(limit=16, filters=COLD)
        first = call(limit=8, filters=COLD)
        assert first.next_page_token
        second = call(limit=8, filters=COLD, page_token=first.next_page_token)
        assert ids(first) + ids(second) == ids(whole)
        assert len(set(ids(first) + ids(second))) == 16
        assert [r.rank for r in second.recommendations] == list(range(9, 17))
        assert all_cold(first) and all_cold(second)


def test_diversity_keeps_the_filter(stack: Stack):
    resp = recommend(stack, NARUTO, BLEACH, limit=10, diversity=0.5, filters=COLD)
    assert len(resp.recommendations) == 10 and all_cold(resp) and resp.served_by.reranked


def test_wmf_cannot_rank_cold_anime_so_popularity_among_them_serves_and_says_why(stack: Stack):
    user = training_user(stack)
    for resp in (
        for_user(stack, user, limit=10, filters=COLD, strategy=S.STRATEGY_WMF),
        recommend(stack, NARUTO, limit=10, filters=COLD, strategy=S.STRATEGY_WMF),
    ):
        assert resp.served_by.strategy == S.STRATEGY_POPULARITY and resp.served_by.degraded
        assert "cold_start_only" in resp.served_by.degraded_reason
        assert len(resp.recommendations) == 10 and all_cold(resp)
        members = [r.members for r in resp.recommendations]
        assert members == sorted(members, reverse=True)
    popular = recommend(stack, NARUTO, limit=10, filters=COLD, strategy=S.STRATEGY_POPULARITY)
    assert popular.served_by.strategy == S.STRATEGY_POPULARITY and all_cold(popular)
    assert not popular.served_by.degraded  # asked for popularity, got it


def test_the_client_asks_for_new_anime_with_new_only(stack: Stack, capsys):
    def run(*args: str) -> str:
        assert client.main(["--address", stack.procs["gateway"].spec.address, "--api-key", API_KEYS[0], *args]) == 0
        return capsys.readouterr().out

    recs = json.loads(run("recommend", "Naruto", "--new-only", "--limit", "8", "--json"))["recommendations"]
    assert len(recs) == 8 and all(r.get("coldStart") or r.get("heldOut") for r in recs)
    table = run("similar", "--id", str(BEBOP), "--cold-start-only", "--limit", "5")
    assert "cold start" in table or "held out" in table  # the legend of the marks the rows carry

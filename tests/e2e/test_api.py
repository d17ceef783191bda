"""The public API over real sockets: favourites, similar, free text, filters, paging, explanations,
MAL import, autocomplete, model info, health and metrics. Catalogue facts used below come from the
sample data (data/mal/sample/anime_sample.csv): Naruto 20, Bleach 269, Fullmetal Alchemist 121,
Cowboy Bebop 1; the sample has no years."""

from __future__ import annotations

import gzip
import json
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from anime2vec.serving.limits import DEFAULTS, RequestLimits
from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import AUTH, Stack

S = common_pb2
NARUTO, BLEACH, FMA, BEBOP = 20, 269, 121, 1
FMA_FRANCHISE = {121, 5114, 430, 908, 9135, 6421}  # every "Fullmetal Alchemist" title in the sample


def recommend(stack: Stack, *refs, **options) -> gateway_pb2.RecommendResponse:
    favourites = [S.AnimeRef(anime_id=r) if isinstance(r, int) else S.AnimeRef(title=r) for r in refs]
    return stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(favourites=favourites, options=S.RecommendOptions(**options)),
        metadata=AUTH,
        timeout=30,
    )


def ids(resp) -> list[int]:
    return [r.anime_id for r in resp.recommendations]


def test_health_reflection_and_metrics_of_every_service(stack: Stack):
    recommend(stack, "Naruto")  # one call through gateway and ranker, so their RPC counters exist
    stack.gateway.SearchText(gateway_pb2.SearchTextRequest(query="a samurai story"), metadata=AUTH, timeout=30)
    for name, service in (
        ("encoder", "anime2vec.v1.EncoderService"),
        ("ranker", "anime2vec.v1.RankerService"),
        ("gateway", "anime2vec.v1.GatewayService"),
    ):
        with grpc.insecure_channel(stack.procs[name].spec.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for svc in ("", service):  # health and reflection need no API key, even on the gateway
                assert (
                    health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            assert service in set(ProtoReflectionDescriptorDatabase(channel).get_services())
        body = urllib.request.urlopen(stack.metrics_url(name), timeout=10).read().decode()
        assert f'a2v_rpc_requests_total{{code="OK",method="{service}/' in body
        assert "a2v_rpc_latency_seconds_bucket" in body and "a2v_rpc_in_flight" in body
        assert "a2v_model_info{" in body and f'service="{name}"' in body
    ranker_metrics = urllib.request.urlopen(stack.metrics_url("ranker"), timeout=10).read().decode()
    # the search went through the vectors in memory; Qdrant's histogram is there for its other calls
    assert "a2v_memory_search_seconds_count" in ranker_metrics and "a2v_model_offline_metric{" in ranker_metrics
    assert "# TYPE a2v_qdrant_query_seconds histogram" in ranker_metrics
    encoder_metrics = urllib.request.urlopen(stack.metrics_url("encoder"), timeout=10).read().decode()
    assert "a2v_encoder_batch_size_count" in encoder_metrics


def test_favourites_by_title_and_by_id_give_the_same_ranking(stack: Stack):
    by_title = recommend(stack, "Naruto", "bleach", "Fulmetal Alchemist", limit=20)
    by_id = recommend(stack, NARUTO, BLEACH, FMA, limit=20)
    assert [(f.anime_id, f.title) for f in by_title.favourites] == [
        (NARUTO, "Naruto"),
        (BLEACH, "Bleach"),
        (FMA, "Fullmetal Alchemist"),
    ]
    exact, case_folded, typo = by_title.favourites
    assert exact.match_score == 100 and case_folded.match_score == 100
    assert 85 <= typo.match_score < 100 and typo.matched_name == "Fullmetal Alchemist"
    assert by_id.favourites[0].matched_name == "" and by_id.favourites[0].title == "Naruto"
    assert ids(by_title) == ids(by_id) and len(ids(by_id)) == 20
    assert not {NARUTO, BLEACH, FMA} & set(ids(by_id))  # the query's own anime are not recommended
    served = by_id.served_by
    assert served.strategy == S.STRATEGY_DROPOUTNET and not served.degraded and served.degraded_reason == ""
    assert served.model_version == stack.bundle.name
    scores = [r.score for r in by_id.recommendations]
    assert scores == sorted(scores, reverse=True) and [r.rank for r in by_id.recommendations] == list(range(1, 21))


def test_similar_resolves_the_anime_and_never_returns_it(stack: Stack):
    resp = stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(title="Cowboy Bebop")), metadata=AUTH, timeout=30
    )
    (query,) = resp.favourites
    assert (query.anime_id, query.title, query.match_score) == (BEBOP, "Cowboy Bebop", 100)
    assert len(resp.recommendations) == 10 and BEBOP not in ids(resp)
    by_id = stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(anime_id=BEBOP)), metadata=AUTH, timeout=30
    )
    assert ids(by_id) == ids(resp)


def test_free_text_is_ranked_and_explained_as_a_text_match(stack: Stack):
    resp = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(
            query="a lonely bounty hunter crew drifts through space", options=S.RecommendOptions(limit=5, explain=True)
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert len(resp.recommendations) == 5 and resp.served_by.strategy == S.STRATEGY_DROPOUTNET
    assert not resp.served_by.degraded and not resp.favourites
    for r in resp.recommendations:
        assert r.reasons and r.reasons[0].kind == S.REASON_KIND_TEXT_MATCH


def test_free_text_about_alchemist_brothers_finds_fullmetal_alchemist(stack: Stack):
    resp = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(
            query="two brothers use alchemy to search for the philosopher's stone to restore their bodies",
            options=S.RecommendOptions(limit=10),
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert FMA_FRANCHISE & set(ids(resp))


def test_filters_on_genres_and_types(stack: Stack):
    sports = recommend(stack, NARUTO, limit=15, filters=S.Filters(include_genres=["sports"]))  # case-insensitive
    assert len(sports.recommendations) == 15
    assert all("Sports" in r.genres for r in sports.recommendations)
    no_comedy = recommend(stack, NARUTO, limit=30, filters=S.Filters(exclude_genres=["Comedy"]))
    assert len(no_comedy.recommendations) == 30 and all("Comedy" not in r.genres for r in no_comedy.recommendations)
    movies = recommend(stack, NARUTO, limit=20, filters=S.Filters(types=["Movie", "OVA"], exclude_ids=[442, 936]))
    assert {r.type for r in movies.recommendations} <= {"Movie", "OVA"} and len(movies.recommendations) == 20
    assert not {442, 936} & set(ids(movies))
    unfiltered = recommend(stack, NARUTO, limit=30)
    assert {r.type for r in unfiltered.recommendations} - {"Movie", "OVA"}  # the filter did remove something


def test_three_pages_have_no_duplicates_and_continue_the_ranks(stack: Stack):
    seen, token = [], ""
    for page in range(3):
        resp = recommend(stack, "Naruto", "Bleach", limit=10, page_token=token, diversity=0.3)
        assert [r.rank for r in resp.recommendations] == list(range(page * 10 + 1, page * 10 + 11))
        seen += ids(resp)
        token = resp.next_page_token
        assert token
    assert len(seen) == len(set(seen)) == 30
    # one request of 30 ranks exactly the same anime
    assert ids(recommend(stack, "Naruto", "Bleach", limit=30, diversity=0.3)) == seen


def test_free_text_pages_continue_the_same_query(stack: Stack):
    query = "a high school volleyball team trains for the national tournament"
    first = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(query=query, options=S.RecommendOptions(limit=10)), metadata=AUTH, timeout=30
    )
    second = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(
            query=query, options=S.RecommendOptions(limit=10, page_token=first.next_page_token)
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert [r.rank for r in second.recommendations] == list(range(11, 21))
    assert not set(ids(first)) & set(ids(second))


def test_explanations_name_the_favourites_and_sum_to_one(stack: Stack):
    plain = recommend(stack, NARUTO, FMA, limit=10)
    assert all(not r.reasons for r in plain.recommendations)
    explained = recommend(stack, NARUTO, FMA, limit=10, explain=True)
    assert ids(explained) == ids(plain)
    named = set()
    # the ranker gives no reason when none of its rules applies (no shared genre, story cosine <= 0.15)
    assert sum(bool(r.reasons) for r in explained.recommendations) >= 8
    for r in explained.recommendations:
        weights = [x.weight for x in r.reasons]
        assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(
            1 if r.reasons else 0, abs=1e-3
        )
        for x in r.reasons:
            assert x.detail and x.kind != S.REASON_KIND_UNSPECIFIED
            if x.kind == S.REASON_KIND_SIMILAR_TO_FAVOURITE:
                assert (x.anime_id, x.title) in {(NARUTO, "Naruto"), (FMA, "Fullmetal Alchemist")}
                named.add(x.anime_id)
            if x.kind == S.REASON_KIND_SHARED_GENRES:  # the genres it names are the recommendation's own
                assert any(g in x.detail for g in r.genres)
    assert named, "no recommendation was explained by a favourite"


MAL_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<myanimelist>
  <myinfo><user_name>e2e_tester</user_name><user_export_type>1</user_export_type></myinfo>
  <anime><series_animedb_id>20</series_animedb_id><series_title><![CDATA[Naruto]]></series_title>
    <my_watched_episodes>220</my_watched_episodes><my_score>9</my_score><my_status>Completed</my_status></anime>
  <anime><series_animedb_id>269</series_animedb_id><series_title><![CDATA[Bleach]]></series_title>
    <my_watched_episodes>100</my_watched_episodes><my_score>8</my_score><my_status>Watching</my_status></anime>
  <anime><series_animedb_id>121</series_animedb_id><series_title><![CDATA[Fullmetal Alchemist]]></series_title>
    <my_watched_episodes>51</my_watched_episodes><my_score>0</my_score><my_status>Completed</my_status></anime>
  <anime><series_animedb_id>1</series_animedb_id><series_title><![CDATA[Cowboy Bebop]]></series_title>
    <my_watched_episodes>3</my_watched_episodes><my_score>3</my_score><my_status>Dropped</my_status></anime>
  <anime><series_animedb_id>5114</series_animedb_id><series_title><![CDATA[FMA: Brotherhood]]></series_title>
    <my_watched_episodes>0</my_watched_episodes><my_score>0</my_score><my_status>Plan to Watch</my_status></anime>
  <anime><series_animedb_id>1735</series_animedb_id><series_title><![CDATA[Naruto: Shippuuden]]></series_title>
    <my_watched_episodes>50</my_watched_episodes><my_score>6</my_score><my_status>Completed</my_status></anime>
  <anime><series_animedb_id>999999999</series_animedb_id><series_title><![CDATA[Not in the sample]]></series_title>
    <my_watched_episodes>12</my_watched_episodes><my_score>10</my_score><my_status>Completed</my_status></anime>
</myanimelist>
"""


@pytest.mark.parametrize("compress", [False, True], ids=["xml", "xml.gz"])
def test_mal_import_reads_favourites_and_excludes_the_whole_list(stack: Stack, compress: bool):
    data = MAL_XML.encode()
    data = gzip.compress(data) if compress else data
    request = gateway_pb2.ImportMalListRequest(mal_xml=data, options=S.RecommendOptions(limit=30))
    resp = stack.gateway.ImportMalList(request, metadata=AUTH, timeout=30)
    assert resp.username == "e2e_tester" and resp.entries_read == 7
    # 1735 (Shippuuden) is not in the 800-anime sample either
    assert resp.entries_unknown == 2
    # scored 9 and 8 first, the unscored completed one last; dropped and plan-to-watch are no favourites
    assert [(f.anime_id, f.score, f.status) for f in resp.favourites] == [
        (NARUTO, 9, "Completed"),
        (BLEACH, 8, "Watching"),
        (FMA, 0, "Completed"),
    ]
    weights = [f.weight for f in resp.favourites]
    assert weights == sorted(weights, reverse=True) and weights[-1] > 0
    assert resp.favourites[0].title == "Naruto"
    assert len(resp.recommendations) == 30
    assert not {NARUTO, BLEACH, FMA, BEBOP, 5114} & set(ids(resp))  # every listed anime, any status
    page2 = stack.gateway.ImportMalList(
        gateway_pb2.ImportMalListRequest(
            mal_xml=data, options=S.RecommendOptions(limit=30, page_token=resp.next_page_token)
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert page2.recommendations[0].rank == 31 and not set(ids(page2)) & set(ids(resp))


def test_mal_import_min_score_drops_lower_scores(stack: Stack):
    resp = stack.gateway.ImportMalList(
        gateway_pb2.ImportMalListRequest(mal_xml=MAL_XML.encode(), min_score=9), metadata=AUTH, timeout=30
    )
    assert [f.anime_id for f in resp.favourites] == [NARUTO, FMA]  # 8 is below 9; unscored still counts


def test_resolve_titles_autocompletes(stack: Stack):
    resp = stack.gateway.ResolveTitles(
        gateway_pb2.ResolveTitlesRequest(query="fullmetal alch", limit=4), metadata=AUTH, timeout=30
    )
    assert len(resp.candidates) == 4 and {c.anime_id for c in resp.candidates} <= FMA_FRANCHISE
    assert resp.candidates[0].anime_id == 5114  # most members among the equally good prefix matches
    assert all(c.type and c.members > 0 for c in resp.candidates)
    nothing = stack.gateway.ResolveTitles(
        gateway_pb2.ResolveTitlesRequest(query="qqqqqqqqqqzzzzzzzzz"), metadata=AUTH, timeout=30
    )
    assert list(nothing.candidates) == []


def test_model_info_describes_the_served_bundle(stack: Stack):
    info = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30)
    model = info.model
    # the ranker's request limits (its settings, here the shared defaults), which the gateway follows
    assert RequestLimits.from_proto(info.limits) == DEFAULTS and info.limits.max_limit == DEFAULTS.max_limit
    manifest = json.loads((stack.bundle / "manifest.json").read_text())
    assert model.version == stack.bundle.name == manifest["version"]
    assert (model.encoder_name, model.encoder_dim) == ("all-MiniLM-L6-v2", 384)
    assert model.encoder_fingerprint == manifest["encoder"]["fingerprint"]
    assert model.n_items >= 800 and model.n_users == manifest["dims"]["n_users"]
    assert model.offline_metrics  # the evaluation the bundle was selected on

"""Explanations over real sockets (gateway → ranker, the sample bundle): each recommendation names
the favourite it is closest to and the words both synopses really share; free text names the
query's words; an anime added through the API explains and is explained by its own text."""

from __future__ import annotations

import json

import pytest

from anime2vec.v1 import common_pb2, gateway_pb2
from services.ranker.explanations import TOKEN, fold_accents, term_key
from tests.e2e.support import AUTH, Stack

S = common_pb2
NARUTO, FMA = 20, 121
CORSAIRS = S.AnimeInput(
    title="Brine Buccaneers of the Coral Sea",
    synopsis=(
        "Young pirates crew a battered ship across the open sea, hunting the buried treasure of a "
        "legendary pirate king. They chart islands, outrun navy warships and fight rival pirate "
        "crews for the treasure map."
    ),
    genres=["Adventure", "Action"],
    type="TV",
    episodes=12,
)


@pytest.fixture(scope="module")
def synopses(services) -> dict[int, str]:
    with open(services.bundle / "catalog.jsonl") as f:
        return {int(row["anime_id"]): row.get("synopsis") or "" for row in map(json.loads, f)}


def words(text: str) -> set[str]:
    """The terms a text uses, as the ranker keys them (lower-case, accents and plurals folded)."""
    return {k for k in map(term_key, TOKEN.findall(fold_accents(text))) if k}


def in_text(term: str, text: str) -> bool:
    return {term_key(w) for w in TOKEN.findall(term)} <= words(text)


def recommend(stack: Stack, *ids: int, explain: bool = True, **options) -> gateway_pb2.RecommendResponse:
    return stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(
            favourites=[S.AnimeRef(anime_id=a) for a in ids], options=S.RecommendOptions(explain=explain, **options)
        ),
        metadata=AUTH,
        timeout=30,
    )


def test_each_recommendation_names_its_closest_favourite_and_the_words_they_share(stack: Stack, synopses):
    resp = recommend(stack, NARUTO, FMA, limit=20)
    with_terms = 0
    for r in resp.recommendations:
        fav = [x for x in r.reasons if x.kind == S.REASON_KIND_SIMILAR_TO_FAVOURITE]
        assert fav, f"{r.title}: no favourite named"
        first = fav[0]
        assert first.anime_id in (NARUTO, FMA) and first.title in r.explanation
        assert -1 <= first.similarity <= 1
        assert set(first.shared_genres) <= set(r.genres)
        for term in first.terms:  # in both synopses, and never a stop word, generic word or genre
            assert in_text(term, synopses[r.anime_id]) and in_text(term, synopses[first.anime_id]), term
            assert term_key(term.split()[-1]) and term.casefold() not in {g.casefold() for g in r.genres}
        with_terms += bool(first.terms)
        if first.terms:
            assert r.explanation.startswith(f"Like {first.title} (your favourite): {', '.join(first.terms)}")
    # the sample model ranks mostly by taste, not story, but some of its 20 share words (e.g.
    # Baccano! shares "alchemy" with Fullmetal Alchemist)
    assert with_terms >= 1
    plain = recommend(stack, NARUTO, FMA, limit=20, explain=False).recommendations
    assert [r.anime_id for r in plain] == [r.anime_id for r in resp.recommendations]
    assert not any(r.reasons or r.explanation for r in plain)


def test_free_text_names_the_query_words_the_synopsis_shares(stack: Stack, synopses):
    query = "two brothers use alchemy to search for the philosopher's stone to restore their bodies"
    resp = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(query=query, options=S.RecommendOptions(limit=10, explain=True)),
        metadata=AUTH,
        timeout=30,
    )
    asked = words(query)
    matched = 0
    for r in resp.recommendations:
        lead = r.reasons[0]
        assert lead.kind == S.REASON_KIND_TEXT_MATCH and r.explanation
        for term in lead.terms:
            assert {term_key(w) for w in TOKEN.findall(term)} <= asked
            assert r.anime_id not in synopses or in_text(term, synopses[r.anime_id])  # other tests add anime
        matched += len(lead.terms) >= 2
        if lead.terms:
            assert r.explanation == "Matches your description: " + ", ".join(lead.terms)
    assert matched >= 1


def test_an_added_anime_explains_and_is_explained_by_its_own_text(stack: Stack, synopses):
    added = stack.gateway.AddAnime(gateway_pb2.AddAnimeRequest(anime=CORSAIRS), metadata=AUTH, timeout=60)
    # as the favourite: named in every explanation; any words shown are in its synopsis and the other's
    resp = recommend(stack, added.anime_id, limit=10)
    assert len(resp.recommendations) == 10
    for r in resp.recommendations:
        first = next(x for x in r.reasons if x.kind == S.REASON_KIND_SIMILAR_TO_FAVOURITE)
        assert (first.anime_id, first.title) == (added.anime_id, CORSAIRS.title) and CORSAIRS.title in r.explanation
        # other tests of the session add anime too; their synopses are not in the catalogue file
        other = synopses.get(r.anime_id)
        assert all(in_text(t, CORSAIRS.synopsis) and (other is None or in_text(t, other)) for t in first.terms)
    # as a recommendation: its own synopsis is what matches the words of a query
    found = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(
            query="pirates hunting buried treasure across the sea", options=S.RecommendOptions(limit=10, explain=True)
        ),
        metadata=AUTH,
        timeout=30,
    )
    mine = next(r for r in found.recommendations if r.anime_id == added.anime_id)
    assert "buried treasure" in mine.reasons[0].terms  # a phrase of the query and of its synopsis
    assert all(in_text(t, CORSAIRS.synopsis) for t in mine.reasons[0].terms)

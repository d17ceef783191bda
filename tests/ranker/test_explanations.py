"""Explanations on a hand-made corpus whose connecting terms are known: TF-IDF terms high in both
texts, phrases, names and generic words left out, topicality, and the reasons and line built
from them. (Over real sockets: tests/e2e/test_explanations.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from anime2vec.v1 import common_pb2
from services.ranker.explanations import (
    Anchor,
    Subject,
    TermIndex,
    TermProfile,
    connecting_terms,
    explain,
    fold_plural,
    scan_corpus,
    topicality,
)

S = common_pb2
FMA = (
    "Two brothers study alchemy. Edward Elric and Alphonse search for the Philosopher's Stone "
    "to restore their bodies. A fantasy series."
)
FMA_B = (
    "The Elric brothers return: young alchemists hunt the philosopher's stone again, and alchemy "
    "has a price. An action series."
)
VOLLEY = "A high school volleyball team trains for the national tournament."
BAKER = "Elric the baker sells bread in a quiet town."
PIRATES = "Pirates sail the sea hunting for buried treasure. A series."
OTHERS = [
    "A girl raises a dragon in the mountains.",
    "Robots fight over a ruined city.",
    "Cooking rivals meet at a summer festival.",
]
CORPUS = [FMA, FMA_B, VOLLEY, BAKER, PIRATES, *OTHERS]  # 8 synopses; terms in more than 4 are boilerplate


@pytest.fixture(scope="module")
def index() -> TermIndex:
    return TermIndex(CORPUS)  # no content vectors: every term counts as topical


def test_the_connecting_terms_are_the_shared_distinctive_ones(index):
    # shared by the two synopses: brothers, alchemy, philosopher, stone (adjacent in both: a
    # phrase, scoring as its two words together), Elric (a name: capitalised all 3 times it
    # occurs in the corpus), series (generic), the/and/for (stop words). alchemy and brothers tie
    # (each once in each text, both in 2 of 8 texts) and sort alphabetically.
    terms = connecting_terms(index.profile(FMA_B), index.profile(FMA))
    assert [t for t, _ in terms] == ["philosopher's stone", "alchemy", "brothers"]
    assert terms[0][1] == pytest.approx(2 * terms[1][1]) and terms[1][1] == pytest.approx(terms[2][1])
    assert "elric" in index.names and "alchemy" not in index.names
    # words shown elsewhere (the genres) are never terms; k caps the list
    assert [t for t, _ in connecting_terms(index.profile(FMA_B), index.profile(FMA), exclude=["Alchemy"])] == [
        "philosopher's stone",
        "brothers",
    ]
    assert len(connecting_terms(index.profile(FMA_B), index.profile(FMA), k=1)) == 1
    # nothing in common: no terms
    assert connecting_terms(index.profile(VOLLEY), index.profile(PIRATES)) == []


def test_a_free_text_query_matches_through_plurals_and_keeps_its_names(index):
    query = index.profile("the Elric brother who studies alchemy", literal=True)
    terms = [t for t, _ in connecting_terms(index.profile(FMA_B, literal=True), query)]
    # "brother" found "brothers", and the typed name counts: together the phrase the synopsis writes
    assert terms == ["elric brothers", "alchemy"]
    assert "elric" not in index.profile(FMA_B).weights
    assert fold_plural("brothers") == fold_plural("brother") == "brother"
    assert fold_plural("bodies") == "body" and fold_plural("boss") == "boss" and fold_plural("alchemy") == "alchemy"


def test_topicality_is_the_mean_pairwise_cosine_of_the_texts_using_a_term():
    texts = [
        "alchemy brothers",
        "alchemy brother treasure",
        "Treasure town",
        "town of the volleyball",
        "a dragon",
        "a robot",
    ]
    terms, df, uses, names, common = scan_corpus(texts)
    col = {t: j for j, t in enumerate(terms)}
    assert sorted(terms) == ["alchemy", "brother", "dragon", "robot", "town", "treasure", "volleyball"]
    assert df[col["brother"]] == 2 and not common  # plurals fold; "of", "the", "a" are stop words
    content = np.array([[1, 0], [1, 0], [-1, 0], [0, 1], [1, 1], [1, -1]], np.float32)
    topic = topicality(uses, content)
    assert topic[col["alchemy"]] == pytest.approx(1.0)  # texts 0 and 1: same direction
    assert topic[col["treasure"]] == pytest.approx(-1.0)  # texts 1 and 2: opposite
    assert topic[col["town"]] == pytest.approx(0.0)  # texts 2 and 3: orthogonal
    assert topic[col["volleyball"]] == 0.0  # one text: no pair
    assert uses.shape == (6, 7) and uses.sum() == 11
    assert not names  # "Treasure" once capitalised, once not; names need 3 uses anyway
    _, _, _, _, common = scan_corpus(["town a", "town b", "town c", "dragon"])
    assert common == {"town"}  # in 3 of 4 texts: boilerplate


def test_a_term_below_the_topicality_floor_is_not_shown_alone():
    # alchemy, brothers, philosopher and stone are used by FMA and FMA_B only: their topicality is
    # the cosine of those two texts' vectors. Opposite vectors (-1): nothing is shown, not even the
    # phrase (it needs one topical word); the same direction (1): all of it.
    flipped = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, 2], [2, 1], [0, 3]], np.float32)
    idx = TermIndex(CORPUS, content=flipped)
    assert [t for t, _ in connecting_terms(idx.profile(FMA_B), idx.profile(FMA))] == []
    aligned = np.array([[1, 0], [1, 0], [0, 1], [0, -1], [-1, 1], [1, 2], [2, 1], [0, 3]], np.float32)
    idx = TermIndex(CORPUS, content=aligned)
    assert [t for t, _ in connecting_terms(idx.profile(FMA_B), idx.profile(FMA))] == [
        "philosopher's stone",
        "alchemy",
        "brothers",
    ]


def anchors() -> list[Anchor]:
    return [
        Anchor(121, "Fullmetal Alchemist", np.array([1.0, 0.1]), ["Action", "Fantasy", "Military"], FMA),
        Anchor(32, "Haikyuu!!", np.array([0.0, 1.0]), ["Sports", "School"], VOLLEY),
    ]


def test_a_favourite_reason_names_the_closest_favourite_with_terms_and_genres(index):
    rec = Subject(5114, np.array([0.9, 0.2]), ["Action", "Adventure", "Fantasy"], FMA_B, 3_000_000)
    reasons, line = explain(rec, anchors(), "favourites", terms=index)
    fav = reasons[0]
    assert fav.kind == S.REASON_KIND_SIMILAR_TO_FAVOURITE and (fav.anime_id, fav.title) == (121, "Fullmetal Alchemist")
    assert list(fav.terms) == ["philosopher's stone", "alchemy", "brothers"]
    assert list(fav.shared_genres) == ["Action", "Fantasy"]
    assert fav.similarity == pytest.approx(
        np.dot([0.9, 0.2], [1, 0.1]) / np.linalg.norm([0.9, 0.2]) / np.linalg.norm([1, 0.1]), rel=1e-5
    )
    assert line == (
        "Like Fullmetal Alchemist (your favourite): philosopher's stone, alchemy, brothers; shares Action, Fantasy"
    )
    assert fav.detail == line
    # Haikyuu (cosine 0.22 > 0.15) is named second; the genres shared overall have their own reason
    assert [r.anime_id for r in reasons if r.kind == S.REASON_KIND_SIMILAR_TO_FAVOURITE] == [121, 32]
    genres = next(r for r in reasons if r.kind == S.REASON_KIND_SHARED_GENRES)
    assert list(genres.shared_genres) == ["Action", "Fantasy"] and genres.detail.endswith("with your favourites")
    assert sum(r.weight for r in reasons) == pytest.approx(1.0)
    assert [r.weight for r in reasons] == sorted((r.weight for r in reasons), reverse=True)


def test_text_queries_lead_with_the_matching_words(index):
    rec = Subject(5114, np.array([0.9, 0.2]), ["Action"], FMA_B)
    reasons, line = explain(
        rec,
        [],
        "text",
        terms=index,
        query_content=np.array([1.0, 0.0]),
        query_text="two brothers hunt for the philosopher's stone with alchemy",
    )
    assert [r.kind for r in reasons] == [S.REASON_KIND_TEXT_MATCH]
    # "hunt" is in one synopsis of eight (alchemy, brothers: two): rarer, so it ranks above them
    assert list(reasons[0].terms) == ["philosopher's stone", "hunt", "alchemy", "brothers"]
    assert line == "Matches your description: philosopher's stone, hunt, alchemy, brothers"
    assert reasons[0].similarity == pytest.approx(0.9 / np.linalg.norm([0.9, 0.2]), rel=1e-5)


def test_a_fallback_leads_with_its_signal_and_still_names_the_favourite(index):
    rec = Subject(5114, np.array([0.9, 0.2]), ["Action"], FMA_B, 1234)
    reasons, line = explain(rec, anchors()[:1], "favourites", fallback="popularity", terms=index)
    assert reasons[0].kind == S.REASON_KIND_POPULAR
    assert line.startswith("Widely watched (1,234 MAL members); like Fullmetal Alchemist (your favourite): ")
    # without a term index (a catalogue without synopses) the favourite and genres are still
    # named; how depends on the content cosine
    _, line = explain(rec, anchors()[:1], "similar")
    assert line == "Close in story to Fullmetal Alchemist; shares Action"
    far = Subject(5114, np.array([-0.1, 1.0]), ["Action"], FMA_B)
    assert explain(far, anchors()[:1], "similar")[1] == "Shares Action with Fullmetal Alchemist"
    far.genres = ["Romance"]
    assert (
        explain(far, anchors()[:1], "user")[1]
        == "Of the anime you gave, closest in story to Fullmetal Alchemist (one of your top-rated)"
    )


def test_term_profiles_of_added_texts_are_cached(index):
    assert index.profile("a brand new synopsis about alchemy") is index.profile("a brand new synopsis about alchemy")
    assert isinstance(index.profile(""), TermProfile) and index.profile("").weights == {}

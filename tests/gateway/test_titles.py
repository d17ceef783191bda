"""TitleIndex on the real MAL 2021 catalogue (ids checked against the file) and on tiny hand-made ones."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import pytest

from anime2vec.paths import default_data_dir
from services.gateway.titles import MAX_QUERY_CHARS, TitleIndex

META = Path(default_data_dir()) / "anime_mal2021_meta.csv.xz"


def _catalogue(rows: list[tuple]) -> pd.DataFrame:
    """(anime_id, title, english, japanese, synonyms, type, members) rows -> catalogue frame."""
    frame = pd.DataFrame(
        rows, columns=["anime_id", "title", "title_english", "title_japanese", "synonyms", "type", "members"]
    )
    return frame.set_index("anime_id")


@pytest.fixture(scope="module")
def index() -> TitleIndex:
    if not META.exists():
        pytest.skip(f"{META} not available")
    raw = pd.read_csv(
        META, usecols=["anime_id", "title", "title_english", "title_japanese", "title_synonyms", "type", "members"]
    )

    def text(column: str) -> pd.Series:  # as the data loader does: '' when none, HTML decoded
        return raw[column].fillna("").map(html.unescape).str.strip()

    catalog = pd.DataFrame(
        {
            "title": text("title"),
            "title_english": text("title_english"),
            "title_japanese": text("title_japanese"),
            # the file separates synonyms with ", "
            "synonyms": [
                tuple(s.strip() for s in v.split(", ") if s.strip()) if isinstance(v, str) else ()
                for v in raw["title_synonyms"]
            ],
            "type": raw["type"].fillna(""),
            "members": raw["members"],
        }
    ).set_index(raw["anime_id"])
    return TitleIndex(catalog)


@pytest.mark.parametrize(
    "query, anime_id, matched_on",
    [
        ("Naruto", 20, "exact_title"),
        ("Bleach", 269, "exact_title"),
        ("Fullmetal Alchemist", 121, "exact_title"),  # the 2003 series, not Brotherhood
        ("fullmetal alchemist brotherhood", 5114, "exact_title"),  # ':' ignored in the loose pass
        ("FMAB", 5114, "synonym"),
        ("Hagane no Renkinjutsushi", 121, "synonym"),
        ("Attack on Titan", 16498, "english"),
        ("Shingeki no Kyojin", 16498, "exact_title"),
        ("  SHINGEKI   no kyojin ", 16498, "exact_title"),
        ("進撃の巨人", 16498, "japanese"),
        ("Steins Gate", 9253, "exact_title"),  # real title "Steins;Gate"
        ("Ｎａｒｕｔｏ", 20, "exact_title"),  # full-width, NFKC-folded
        ("Narutoo", 20, "fuzzy"),
        ("Cowboy Bebp", 1, "fuzzy"),
        ("bebop cowboy", 1, "fuzzy"),  # word order
        ("naruto shipuden", 1735, "fuzzy"),
        ("Fullmetal alchemist brotherhod", 5114, "fuzzy"),
    ],
)
def test_resolves_real_titles(index, query, anime_id, matched_on):
    resolution = index.resolve(query)
    assert (resolution.anime_id, resolution.matched_on) == (anime_id, matched_on)
    assert resolution.resolved
    if matched_on == "fuzzy":
        assert 85.0 <= resolution.score <= 100.0 and resolution.suggestions == ()
    else:
        assert resolution.score == 100.0


def test_fuzzy_scores_are_levenshtein_ratios(index):
    # ratio("narutoo", "naruto") = 2 * 6 / 13; ratio("cowboy bebp", "cowboy bebop") = 2 * 11 / 23
    assert index.resolve("Narutoo").score == 92.3
    assert index.resolve("Cowboy Bebp").score == 95.7


def test_same_name_prefers_the_series_then_popularity(index):
    # 鋼の錬金術師 is the Japanese title of both FMA 2003 (TV) and the Brotherhood specials
    fma = index.resolve("鋼の錬金術師")
    assert (fma.anime_id, fma.matched_on) == (121, "japanese")
    assert [s.anime_id for s in fma.suggestions] == [6421]
    # English "Aggretsuko": ONA (126,060 members) beats the TV series (80,192)
    aggretsuko = index.resolve("Aggretsuko")
    assert aggretsuko.anime_id == 36904 and [s.anime_id for s in aggretsuko.suggestions] == [32977]
    # the TV series (11,116 members) beats a more popular Special (23,707) of the same English name
    tachikoma = index.resolve("Ghost in the Shell: Stand Alone Complex: Tachikomatic Days")
    assert tachikoma.anime_id == 10870 and [s.anime_id for s in tachikoma.suggestions] == [1335]


def test_synonym_hit_competes_with_titles_starting_with_the_query(index):
    # "Demon Slayer" is a synonym of the obscure "Onigiri" (32606); Kimetsu no Yaiba's English
    # title starts with it and it is far more popular
    resolution = index.resolve("Demon Slayer")
    assert (resolution.anime_id, resolution.matched_on) == (38000, "title_prefix")
    assert 32606 in [s.anime_id for s in resolution.suggestions]
    # a synonym with no such competitor stays a synonym match
    assert (index.resolve("AoT").anime_id, index.resolve("AoT").matched_on) == (16498, "synonym")


def test_unresolvable_fuzzy_gives_suggestions(index):
    brotherhood = index.resolve("FMA Brotherhood")  # no such name; words found across names
    assert brotherhood.anime_id is None and brotherhood.matched_on is None
    assert brotherhood.suggestions[0].anime_id == 5114
    assert brotherhood.suggestions[0].title == "Fullmetal Alchemist: Brotherhood"
    # "Hunter" (48960) is the closest name, but whole titles start with the query
    hunter = index.resolve("Hunter x")
    assert hunter.anime_id is None
    assert {11061, 136} <= {s.anime_id for s in hunter.suggestions}


def test_nonsense_is_unresolved_with_five_suggestions(index):
    resolution = index.resolve("qzxv wkpj")
    assert not resolution.resolved
    assert len(resolution.suggestions) == 5
    scores = [s.score for s in resolution.suggestions]
    assert scores == sorted(scores, reverse=True) and scores[0] < 85.0
    assert resolution.score == scores[0]


def test_search_autocompletes_prefixes_by_popularity(index):
    results = index.search("nar", limit=5)
    assert results[0].anime_id == 20  # Naruto, the most popular name starting with "nar"
    assert len(results) == 5 and all(r.score == 100.0 for r in results)
    assert index.search("fma bro", limit=3)[0].anime_id == 5114
    typo = index.search("cowboy bebp", limit=3)
    assert typo[0].anime_id == 1 and typo[0].score == 95.7
    assert len(index.search("qzxv wkpj", limit=7)) == 7


@pytest.mark.parametrize("query", ["", "   ", "!!! ...", "x" * (MAX_QUERY_CHARS + 1)])
def test_rejects_unusable_queries(index, query):
    with pytest.raises(ValueError):
        index.resolve(query)


def test_search_limit_is_bounded(index):
    with pytest.raises(ValueError, match="limit"):
        index.search("naruto", limit=0)


def test_extras_lose_ties_even_when_more_popular():
    index = TitleIndex(
        _catalogue(
            [
                (1, "Foo", "", "", (), "TV", 100),
                (2, "Foo", "", "", (), "Special", 1000),
                (3, "Foo", "", "", (), "OVA", 500),
            ]
        )
    )
    resolution = index.resolve("foo")
    assert resolution.anime_id == 3  # non-extras first, then members
    assert [s.anime_id for s in resolution.suggestions] == [1, 2]


def test_fuzzy_needs_a_clear_lead_over_another_anime():
    index = TitleIndex(
        _catalogue(
            [
                (1, "Toradora", "", "", (), "TV", 10),
                (2, "Toradoru", "", "", (), "TV", 5),
            ]
        )
    )
    # ratio("toradorra", "toradora") = 94.1 (5.9 from 100); "toradoru" = 82.4 (17.6 >= 2 x 5.9)
    clear = index.resolve("Toradorra")
    assert (clear.anime_id, clear.matched_on, clear.score) == (1, "fuzzy", 94.1)
    # "toradori" is 87.5 from both: no lead, so unresolved; the tie lists the popular one first
    tie = index.resolve("Toradori")
    assert tie.anime_id is None
    assert [(s.anime_id, s.score) for s in tie.suggestions] == [(1, 87.5), (2, 87.5)]


def test_field_order_title_before_english_before_synonym():
    index = TitleIndex(
        _catalogue(
            [
                (1, "Alpha", "Beta", "", ("Gamma",), "TV", 1),
                (2, "Beta", "Gamma", "", ("Alpha",), "TV", 1000),
                (3, "Delta", "", "", ("Gamma",), "TV", 1_000_000),
            ]
        )
    )
    assert (index.resolve("alpha").anime_id, index.resolve("alpha").matched_on) == (1, "exact_title")
    assert index.resolve("beta").anime_id == 2
    assert (index.resolve("gamma").anime_id, index.resolve("gamma").matched_on) == (2, "english")


def test_catalogue_validation():
    with pytest.raises(ValueError, match="members"):
        TitleIndex(_catalogue([(1, "A", "", "", (), "TV", 1)]).drop(columns="members"))
    with pytest.raises(ValueError, match="duplicates"):
        TitleIndex(_catalogue([(1, "A", "", "", (), "TV", 1), (1, "B", "", "", (), "TV", 1)]))
    with pytest.raises(ValueError, match="empty"):
        TitleIndex(_catalogue([]))

"""MAL list export parsing (plain and gzip, hostile input) and the favourites it yields."""

from __future__ import annotations

import gzip

import pytest

from services.gateway.mal_import import MalEntry, MalImportError, MalList, favourites_from, parse_mal_export


def _anime(anime_id, title, status, score, episodes=0) -> str:
    return f"""
  <anime>
    <series_animedb_id>{anime_id}</series_animedb_id>
    <series_title><![CDATA[{title}]]></series_title>
    <series_type>TV</series_type>
    <series_episodes>{episodes}</series_episodes>
    <my_id>0</my_id>
    <my_watched_episodes>{episodes}</my_watched_episodes>
    <my_start_date>0000-00-00</my_start_date>
    <my_finish_date>0000-00-00</my_finish_date>
    <my_rated></my_rated>
    <my_score>{score}</my_score>
    <my_storage></my_storage>
    <my_storage_value>0.00</my_storage_value>
    <my_status>{status}</my_status>
    <my_comments><![CDATA[]]></my_comments>
    <my_times_watched>0</my_times_watched>
    <my_rewatch_value></my_rewatch_value>
    <my_priority>LOW</my_priority>
    <my_tags><![CDATA[]]></my_tags>
    <my_rewatching>0</my_rewatching>
    <my_rewatching_ep>0</my_rewatching_ep>
    <my_discuss>1</my_discuss>
    <my_sns>default</my_sns>
    <update_on_import>0</update_on_import>
  </anime>"""


def _export(*anime: str, export_type: int = 1) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8" ?>
<!--
 Created by XML Export feature at MyAnimeList.net
 Version 1.1.0
-->
<myanimelist>
  <myinfo>
    <user_id>123456</user_id>
    <user_name>spike</user_name>
    <user_export_type>{export_type}</user_export_type>
    <user_total_anime>{len(anime)}</user_total_anime>
  </myinfo>{"".join(anime)}
</myanimelist>
""".encode()


LIST = _export(
    _anime(1, "Cowboy Bebop", "Completed", 9, 26),
    _anime(5114, "Fullmetal Alchemist: Brotherhood", "Completed", 10, 64),
    _anime(20, "Naruto", "On-Hold", 8, 100),
    _anime(269, "Bleach", "Dropped", 0, 12),
    _anime(121, "Fullmetal Alchemist", "Completed", 5, 51),
    _anime(16498, "Shingeki no Kyojin", "Watching", 0, 10),
    _anime(9253, "Steins;Gate", "Plan to Watch", 0),
    _anime(21, "One Piece", "Dropped", 3, 40),
    _anime(30276, "One Punch Man", "Completed", 6, 12),
    _anime(32281, "Tom & Jerry <3", "Completed", 0, 1),
)


def _error(data: bytes, **limits) -> MalImportError:
    with pytest.raises(MalImportError) as info:
        parse_mal_export(data, **limits)
    return info.value


def test_parses_entries_and_user():
    parsed = parse_mal_export(LIST)
    assert parsed.user_name == "spike"
    assert [e.anime_id for e in parsed.entries] == [1, 5114, 20, 269, 121, 16498, 9253, 21, 30276, 32281]
    assert parsed.entries[0] == MalEntry(1, "Cowboy Bebop", 9, "completed", 26)
    assert parsed.entries[2].status == "on_hold"
    assert parsed.entries[3] == MalEntry(269, "Bleach", None, "dropped", 12)  # 0 = not scored
    assert parsed.entries[6].status == "plan_to_watch"
    assert parsed.entries[9].title == "Tom & Jerry <3"  # CDATA kept verbatim


def test_gzip_export_equals_plain():
    assert parse_mal_export(gzip.compress(LIST)) == parse_mal_export(LIST)


def test_favourites_follow_the_confidence_rules():
    liked, disliked = favourites_from(parse_mal_export(LIST))
    # confidence 1 + (score - 5) * 0.8; unscored 1.0; on-hold x 0.5
    assert liked == [(5114, 5.0), (1, 4.2), (30276, 1.8), (20, 1.7), (16498, 1.0), (32281, 1.0)]
    # lowest score first (One Piece 3, FMA 5), then the unscored drop; plan-to-watch is neither
    assert disliked == [21, 121, 269]


def test_favourites_keep_the_strongest():
    liked, _ = favourites_from(parse_mal_export(LIST), max_n=2)
    assert liked == [(5114, 5.0), (1, 4.2)]
    with pytest.raises(ValueError):
        favourites_from(parse_mal_export(LIST), max_n=0)


def test_a_low_score_is_a_dislike_whatever_the_status():
    parsed = parse_mal_export(_export(_anime(7, "Meh", "Plan to Watch", 4), _anime(8, "Fine", "Dropped", 9)))
    assert favourites_from(parsed) == ([], [7, 8])


def test_status_spellings_and_missing_fields():
    data = b"""<myanimelist>
      <anime><series_animedb_id>1</series_animedb_id><my_status>2</my_status><my_score>7</my_score></anime>
      <anime><series_animedb_id>2</series_animedb_id><my_status>On Hold</my_status></anime>
      <anime><series_animedb_id> 3 </series_animedb_id></anime>
    </myanimelist>"""
    parsed = parse_mal_export(data)
    assert parsed == MalList(
        (
            MalEntry(1, "", 7, "completed", 0),
            MalEntry(2, "", None, "on_hold", 0),
            MalEntry(3, "", None, "plan_to_watch", 0),
        ),
        user_name="",
    )


def test_empty_list_is_valid():
    parsed = parse_mal_export(_export())
    assert parsed.entries == () and favourites_from(parsed) == ([], [])


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<myanimelist><anime><series_animedb_id>1</series_animedb_id>
<series_title>&lol9;</series_title></anime></myanimelist>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE myanimelist [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<myanimelist><myinfo><user_name>&secret;</user_name></myinfo></myanimelist>"""


@pytest.mark.parametrize("payload", [BILLION_LAUGHS, XXE, gzip.compress(BILLION_LAUGHS)])
def test_refuses_dtds_and_entities(payload):
    error = _error(payload)
    assert error.field == "xml" and "document type declarations" in error.problem


def test_truncated_xml():
    error = _error(LIST[: len(LIST) // 2])
    assert error.field == "xml" and error.problem.startswith("malformed XML")


def test_undefined_entity_is_malformed():
    assert _error(b"<myanimelist><myinfo><user_name>&bogus;</user_name></myinfo></myanimelist>").field == "xml"


def test_truncated_and_corrupt_gzip():
    packed = gzip.compress(LIST)
    truncated = _error(packed[:-20])
    assert (truncated.field, truncated.problem) == ("gzip", "the gzip data is truncated")
    assert "corrupt gzip data" in _error(b"\x1f\x8b" + b"not deflate at all").problem
    assert "unexpected bytes after" in _error(packed + b"junk").problem


def test_wrong_root():
    error = _error(b"<html><body>hello</body></html>")
    assert error.field == "myanimelist" and "<html>" in error.problem
    assert "not a MyAnimeList export" in str(error)


def test_manga_export_is_refused():
    manga = _export(export_type=2)
    assert _error(manga).field == "myinfo.user_export_type"
    no_info = b"<myanimelist><manga><manga_mangadb_id>2</manga_mangadb_id></manga></myanimelist>"
    assert "manga list" in _error(no_info).problem


def test_size_limits():
    big = _error(b" " * 1001, max_bytes=1000)
    assert big.field == "data" and "1,001 bytes" in big.problem and big.too_large
    # a gzip bomb: 6 MB of whitespace compresses to a few kB but must not be inflated past the limit
    bomb = gzip.compress(b"<myanimelist>" + b" " * 6_000_000 + b"</myanimelist>")
    assert len(bomb) < 20_000
    error = _error(bomb)
    assert error.field == "gzip" and "more than 5,000,000 bytes" in error.problem and error.too_large
    many = _error(LIST, max_entries=3)  # refused at the fourth entry, before the rest is read
    assert many.field == "anime" and "more than 3 entries" in many.problem and many.too_large


@pytest.mark.parametrize(
    "body, field, fragment, too_large",
    [
        (b"<a>" * 1_390_000, "xml", "nested more than 8 deep", False),  # the element bomb
        (b"<a/>" * 1_000_000, "xml", "more than 601,000 elements", True),  # legal depth, huge count
        (b"<anime>" + b"<f/>" * 65 + b"</anime>", "anime[0]", "more than 64 fields", True),
    ],
)
def test_element_bombs_are_refused_while_parsing(body, field, fragment, too_large):
    error = _error(b"<myanimelist>" + body + b"</myanimelist>")
    assert (error.field, error.too_large) == (field, too_large) and fragment in error.problem


@pytest.mark.parametrize("encoding", ["utf-7", "rot13", "foo-bar", "utf-32", "hex", "idna", "undefined", "x" * 500])
def test_unknown_or_unusable_encodings_are_named(encoding):
    error = _error(f'<?xml version="1.0" encoding="{encoding}"?><myanimelist/>'.encode())
    assert error.field == "xml" and "encoding" in error.problem and len(error.problem) < 200


def test_encodings_an_export_may_have():
    entry = (
        "<myanimelist><anime><series_animedb_id>5</series_animedb_id><series_title>Café</series_title>"
        "</anime></myanimelist>"
    )
    for name, codec in (
        ("UTF-8", "utf-8"),
        ("ISO-8859-1", "latin-1"),
        ("windows-1252", "cp1252"),
        ("utf-16", "utf-16"),
    ):
        parsed = parse_mal_export(f'<?xml version="1.0" encoding="{name}"?>{entry}'.encode(codec))
        assert parsed.entries[0].title == "Café"
    # a UTF-16 document that declares what it cannot be: still a precise error, not a crash
    error = _error('<?xml version="1.0" encoding="utf-7"?><myanimelist/>'.encode("utf-16"))
    assert error.field == "xml"


@pytest.mark.parametrize(
    "anime_xml, field, fragment",
    [
        (
            "<series_animedb_id>abc</series_animedb_id>",
            "anime[1].series_animedb_id",
            "'abc' is not a non-negative integer",
        ),
        ("<series_animedb_id>-5</series_animedb_id>", "anime[1].series_animedb_id", "not a non-negative integer"),
        ("<series_animedb_id>1.5</series_animedb_id>", "anime[1].series_animedb_id", "not a non-negative integer"),
        ("<series_animedb_id>0</series_animedb_id>", "anime[1].series_animedb_id", "not a valid anime id"),
        ("<series_animedb_id>99999999999999999999</series_animedb_id>", "anime[1].series_animedb_id", "too large"),
        ("<series_title>no id</series_title>", "anime[1].series_animedb_id", "missing"),
        ("<series_animedb_id>7</series_animedb_id><my_score>11</my_score>", "anime[1].my_score", "outside 0-10"),
        ("<series_animedb_id>7</series_animedb_id><my_status>Binging</my_status>", "anime[1].my_status", "'Binging'"),
        (
            "<series_animedb_id>7</series_animedb_id><my_watched_episodes>x</my_watched_episodes>",
            "anime[1].my_watched_episodes",
            "not a non-negative integer",
        ),
        ("<series_animedb_id>1</series_animedb_id>", "anime[1].series_animedb_id", "listed twice (also anime[0])"),
    ],
)
def test_bad_fields_are_named(anime_xml, field, fragment):
    data = f"""<myanimelist><anime><series_animedb_id>1</series_animedb_id></anime>
               <anime>{anime_xml}</anime></myanimelist>""".encode()
    error = _error(data)
    assert error.field == field and fragment in error.problem and not error.too_large
    assert isinstance(error, ValueError) and str(error).startswith(field + ": ")


@pytest.mark.parametrize("data, problem", [(b"", "the upload is empty"), ("<myanimelist/>", "expected bytes, got str")])
def test_not_bytes_or_empty(data, problem):
    assert (_error(data).field, _error(data).problem) == ("data", problem)

"""Parse a MyAnimeList anime-list export and turn it into a favourites query.

MAL's export (Profile > Export) is an XML document, served gzip-compressed as
`animelist_<epoch>_<user_id>.xml.gz`:

    <myanimelist>
      <myinfo><user_name>...</user_name><user_export_type>1</user_export_type>...</myinfo>
      <anime>
        <series_animedb_id>1</series_animedb_id>
        <series_title><![CDATA[Cowboy Bebop]]></series_title>
        <my_watched_episodes>26</my_watched_episodes>
        <my_score>9</my_score>             (0 = not scored)
        <my_status>Completed</my_status>   (Watching / Completed / On-Hold / Dropped / Plan to Watch)
        ...
      </anime>
    </myanimelist>

The upload is untrusted: its size is bounded before and after decompression (a gzip bomb stops at
`max_bytes` of output), DTDs are refused outright (defusedxml: no entity expansion, no external
entities), and every field the recommender uses is validated. Any problem raises MalImportError
naming the offending field (`anime[3].my_score`, 0-based) and what is wrong; nothing is returned
half-parsed.

Likes and dislikes follow the data layer's rules (anime2vec.data.confidence) so a favourites query
means what training data means.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeElementTree
import numpy as np

from anime2vec.data.confidence import LIKE_MIN_RATING, MAL_STATUS_CODES, implicit_feedback

MAX_BYTES = 5_000_000
MAX_ENTRIES = 20_000
MAX_ANIME_ID = 2**31 - 1
_GZIP_MAGIC = b"\x1f\x8b"
_DIGITS = re.compile(r"[0-9]+")
# my_status as MAL writes it (and older/other exporters' spellings) -> data-layer status.
_STATUS_NAMES = {
    "watching": "watching", "currently watching": "watching",
    "completed": "completed",
    "on-hold": "on_hold", "on hold": "on_hold",
    "dropped": "dropped",
    "plan to watch": "plan_to_watch", "plan-to-watch": "plan_to_watch",
    **{str(code): status for code, status in MAL_STATUS_CODES.items()},  # numeric codes 1-6
}


class MalImportError(ValueError):
    """The upload is not a usable MAL anime-list export: `field` says where, `problem` what.
    `too_large` marks the size limits (upload, decompressed size, entry count), which a server
    reports as exhausted resources rather than invalid input."""

    def __init__(self, field: str, problem: str, too_large: bool = False):
        self.field, self.problem, self.too_large = field, problem, too_large
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class MalEntry:
    anime_id: int
    title: str
    score: int | None      # 1-10; None when not scored (MAL writes 0)
    status: str            # watching / completed / on_hold / dropped / plan_to_watch
    watched_episodes: int


@dataclass(frozen=True)
class MalList:
    entries: tuple[MalEntry, ...]
    user_name: str         # '' when the export does not say


def parse_mal_export(data: bytes, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> MalList:
    """Parse an export, plain XML or gzip-compressed. Raises MalImportError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalImportError("data", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise MalImportError("data", "the upload is empty")
    if len(data) > max_bytes:
        raise MalImportError("data", f"the upload is {len(data):,} bytes; the limit is {max_bytes:,}", too_large=True)
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data, max_bytes)
    root = _parse_xml(data)
    if root.tag != "myanimelist":
        raise MalImportError("myanimelist", f"the root element is <{root.tag}>, not <myanimelist>: "
                                            "not a MyAnimeList export")
    myinfo = root.find("myinfo")
    export_type = _text(myinfo, "user_export_type") if myinfo is not None else ""
    if export_type == "2" or (root.find("manga") is not None and root.find("anime") is None):
        raise MalImportError("myinfo.user_export_type", "this is a manga list export; upload the anime list")
    anime = root.findall("anime")
    if len(anime) > max_entries:
        raise MalImportError("anime", f"the list has {len(anime):,} entries; the limit is {max_entries:,}",
                             too_large=True)

    entries: list[MalEntry] = []
    first_seen: dict[int, int] = {}
    for i, element in enumerate(anime):
        entry = _entry(element, f"anime[{i}]")
        if entry.anime_id in first_seen:
            raise MalImportError(f"anime[{i}].series_animedb_id",
                                 f"anime {entry.anime_id} is listed twice (also anime[{first_seen[entry.anime_id]}])")
        first_seen[entry.anime_id] = i
        entries.append(entry)
    user_name = _text(myinfo, "user_name") if myinfo is not None else ""
    return MalList(tuple(entries), user_name)


def favourites_from(mal_list: MalList, max_n: int = 50) -> tuple[list[tuple[int, float]], list[int]]:
    """(liked, disliked) for a favourites query.

    liked: (anime_id, weight), at most `max_n`, strongest first (ties in list order). A show is
    liked, with weight = its confidence, exactly when anime2vec.data.confidence.implicit_feedback
    calls it a positive: consumed (watching / completed / on-hold) and not scored below 6.
    disliked: every show scored 5 or less, whatever its status, and every dropped show (the data
    layer's "never recommend it back"); lowest score first, then the other drops, ties in list order.
    Plan-to-watch shows are neither.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    entries = mal_list.entries
    if not entries:
        return [], []
    rating = np.array([np.nan if e.score is None else e.score for e in entries], dtype=np.float32)
    confidence, positive = implicit_feedback(rating, [e.status for e in entries])
    liked = sorted(((e.anime_id, round(float(c), 4)) for e, c, p in zip(entries, confidence, positive) if p),
                   key=lambda pair: -pair[1])[:max_n]
    disliked = [e for e in entries
                if (e.score is not None and e.score < LIKE_MIN_RATING) or e.status == "dropped"]
    disliked.sort(key=lambda e: e.score if e.score is not None and e.score < LIKE_MIN_RATING else LIKE_MIN_RATING)
    return liked, [e.anime_id for e in disliked]


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress one gzip member, refusing output beyond `max_bytes` (gzip bombs)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container only
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise MalImportError("gzip", f"corrupt gzip data ({e})") from None
    if len(out) > max_bytes:
        raise MalImportError("gzip", f"decompresses to more than {max_bytes:,} bytes", too_large=True)
    if not inflater.eof:
        raise MalImportError("gzip", "the gzip data is truncated")
    if inflater.unused_data:
        raise MalImportError("gzip", f"{len(inflater.unused_data):,} unexpected bytes after the gzip data")
    return out


def _parse_xml(data: bytes) -> Element:
    try:
        return SafeElementTree.fromstring(data, forbid_dtd=True)
    except defusedxml.DTDForbidden:
        raise MalImportError("xml", "document type declarations (DTDs, entity definitions) are not "
                                    "allowed; a MyAnimeList export has none") from None
    except defusedxml.DefusedXmlException as e:  # entities / external references (without a DTD)
        raise MalImportError("xml", f"forbidden XML construct: {e}") from None
    except ParseError as e:
        raise MalImportError("xml", f"malformed XML: {e}") from None


def _entry(element: Element, path: str) -> MalEntry:
    anime_id = _integer(element, "series_animedb_id", path, required=True)
    if not 1 <= anime_id <= MAX_ANIME_ID:
        raise MalImportError(f"{path}.series_animedb_id", f"{anime_id} is not a valid anime id (1..{MAX_ANIME_ID})")
    score = _integer(element, "my_score", path)
    if not 0 <= score <= 10:
        raise MalImportError(f"{path}.my_score", f"{score} is outside 0-10 (0 = not scored)")
    status_text = _text(element, "my_status") or "Plan to Watch"  # MAL's default when absent
    status = _STATUS_NAMES.get(" ".join(status_text.split()).casefold())
    if status is None:
        raise MalImportError(f"{path}.my_status", f"unknown status {status_text!r}; expected Watching, "
                                                  "Completed, On-Hold, Dropped or Plan to Watch")
    return MalEntry(anime_id=anime_id, title=_text(element, "series_title"), score=score or None,
                    status=status, watched_episodes=_integer(element, "my_watched_episodes", path))


def _text(element: Element, tag: str) -> str:
    """Stripped text of a child element; '' when absent or empty."""
    child = element.find(tag)
    return (child.text or "").strip() if child is not None else ""


def _integer(element: Element, tag: str, path: str, required: bool = False) -> int:
    """A non-negative decimal integer child; 0 when absent or empty unless required."""
    text = _text(element, tag)
    if not text:
        if required:
            raise MalImportError(f"{path}.{tag}", "missing")
        return 0
    if not _DIGITS.fullmatch(text):
        raise MalImportError(f"{path}.{tag}", f"{text[:40]!r} is not a non-negative integer")
    if len(text) > 10:  # also keeps int() away from huge digit strings
        raise MalImportError(f"{path}.{tag}", f"{text[:40]!r} is too large")
    return int(text)

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
entities), the declared encoding must be one an export can have, and the document is read as it is
parsed, without building a tree, under bounds on depth, elements and entries checked at every
element (4 MiB of unclosed tags is refused at the ninth). Every field the recommender uses is
validated. Any problem raises MalImportError naming the offending field (`anime[3].my_score`,
0-based) and what is wrong; nothing is returned half-parsed.

Likes and dislikes follow the data layer's rules (anime2vec.data.confidence) so a favourites query
means what training data means.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as SafeElementTree
import numpy as np

from anime2vec.data.confidence import LIKE_MIN_RATING, MAL_STATUS_CODES, implicit_feedback

MAX_BYTES = 5_000_000
MAX_ENTRIES = 20_000
MAX_ANIME_ID = 2**31 - 1
MAX_DEPTH = 8  # an export nests 3 deep
MAX_FIELDS_PER_ENTRY = 64  # an export entry has 23
MAX_ELEMENTS_PER_ENTRY = 30  # for the whole document's element bound (an export: ~24 per entry)
_GZIP_MAGIC = b"\x1f\x8b"
_DIGITS = re.compile(r"[0-9]+")
# An ASCII-compatible XML declaration's encoding (after an optional UTF-8 byte order mark).
_DECLARED_ENCODING = re.compile(rb"(?:\xef\xbb\xbf)?\s*<\?xml\s[^>]*?\bencoding\s*=\s*[\"']([^\"']*)[\"']")
_ENCODINGS = {
    "utf-8",
    "utf8",
    "us-ascii",
    "ascii",
    "iso-8859-1",
    "latin-1",
    "latin1",
    "utf-16",
    "utf-16le",
    "utf-16be",
    "windows-1252",
    "cp1252",
}
# my_status as MAL writes it (and older/other exporters' spellings) -> data-layer status.
_STATUS_NAMES = {
    "watching": "watching",
    "currently watching": "watching",
    "completed": "completed",
    "on-hold": "on_hold",
    "on hold": "on_hold",
    "dropped": "dropped",
    "plan to watch": "plan_to_watch",
    "plan-to-watch": "plan_to_watch",
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
    score: int | None  # 1-10; None when not scored (MAL writes 0)
    status: str  # watching / completed / on_hold / dropped / plan_to_watch
    watched_episodes: int


@dataclass(frozen=True)
class MalList:
    entries: tuple[MalEntry, ...]
    user_name: str  # '' when the export does not say


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
    _check_declared_encoding(data)
    reader = _ExportReader(max_entries)
    parser = SafeElementTree.DefusedXMLParser(target=reader, forbid_dtd=True)
    try:
        parser.feed(data)
        parser.close()
    except defusedxml.DTDForbidden:
        raise MalImportError(
            "xml",
            "document type declarations (DTDs, entity definitions) are not allowed; a MyAnimeList export has none",
        ) from None
    except defusedxml.DefusedXmlException as e:  # entities / external references (without a DTD)
        raise MalImportError("xml", f"forbidden XML construct: {e}") from None
    except ParseError as e:
        raise MalImportError("xml", f"malformed XML: {e}") from None
    except (LookupError, ValueError, UnicodeError) as e:  # an encoding expat and Python cannot decode
        if isinstance(e, MalImportError):
            raise
        raise MalImportError(
            "xml", f"cannot decode the declared encoding ({_clip(str(e))}); MyAnimeList exports are UTF-8"
        ) from None
    return reader.result()


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
    liked = sorted(
        ((e.anime_id, round(float(c), 4)) for e, c, p in zip(entries, confidence, positive) if p),
        key=lambda pair: -pair[1],
    )[:max_n]
    disliked = [e for e in entries if (e.score is not None and e.score < LIKE_MIN_RATING) or e.status == "dropped"]
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


def _check_declared_encoding(data: bytes) -> None:
    """Refuse an XML declaration naming an encoding other than the few an export can be in: Python's
    codec registry would otherwise be asked for any name (utf-7, rot13, foo-bar), and fail in ways
    that are not parse errors."""
    m = _DECLARED_ENCODING.match(data)
    if m is None:
        return
    name = m.group(1).decode("ascii", "replace")
    if name.strip().lower().replace("_", "-") not in _ENCODINGS:
        raise MalImportError(
            "xml",
            f"the XML declaration names the encoding {_clip(name)!r}; an export is "
            f"UTF-8 (also accepted: UTF-16, ISO-8859-1, US-ASCII, windows-1252)",
        )


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ExportReader:
    """Parser target that reads an export while it is parsed, keeping only the entry being read: no
    tree is built, and a document that cannot be a MAL export is refused at the element where that
    becomes clear (too deep, too many elements or entries, the wrong root), before the rest is read.
    Element and depth bounds keep memory and time proportional to a real export's, whatever the
    upload holds (1.4 million unclosed tags fit in 4 MiB)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.max_elements = max_entries * MAX_ELEMENTS_PER_ENTRY + 1_000
        self.depth = self.elements = 0
        self.section: str | None = None  # the current child of the root: "anime", "myinfo", ...
        self.field: str | None = None  # the current child of that section
        self.fields: dict[str, str] = {}  # fields of the current section, first occurrence wins
        self.text: list[str] = []
        self.n_fields = 0
        self.entries: list[MalEntry] = []
        self.first_seen: dict[int, int] = {}
        self.user_name = self.export_type = ""
        self.saw_manga = False

    def start(self, tag: str, attrib) -> None:
        self.depth += 1
        self.elements += 1
        if self.depth > MAX_DEPTH:
            raise MalImportError(
                "xml",
                f"elements nested more than {MAX_DEPTH} deep; a MyAnimeList export "
                "nests 3 (myanimelist > anime > field)",
            )
        if self.elements > self.max_elements:
            raise MalImportError(
                "xml",
                f"more than {self.max_elements:,} elements; a list of {self.max_entries:,} entries has fewer",
                too_large=True,
            )
        if self.depth == 1:
            if tag != "myanimelist":
                raise MalImportError(
                    "myanimelist", f"the root element is <{_clip(tag)}>, not <myanimelist>: not a MyAnimeList export"
                )
        elif self.depth == 2:
            self.section, self.fields, self.n_fields = tag, {}, 0
            if tag == "anime" and len(self.entries) >= self.max_entries:
                raise MalImportError(
                    "anime",
                    f"the list has more than {self.max_entries:,} entries; the limit is {self.max_entries:,}",
                    too_large=True,
                )
            self.saw_manga |= tag == "manga"
        elif self.depth == 3:
            self.n_fields += 1
            if self.section == "anime" and self.n_fields > MAX_FIELDS_PER_ENTRY:
                raise MalImportError(
                    f"anime[{len(self.entries)}]",
                    f"more than {MAX_FIELDS_PER_ENTRY} fields; an export entry has about 25",
                    too_large=True,
                )
            self.field, self.text = tag, []

    def data(self, text: str) -> None:
        if self.depth == 3 and self.field is not None and self.section in ("anime", "myinfo"):
            self.text.append(text)

    def end(self, tag: str) -> None:
        if self.depth == 3 and self.field is not None:
            self.fields.setdefault(self.field, "".join(self.text).strip())
            self.field, self.text = None, []
        elif self.depth == 2:
            if self.section == "anime":
                self._add(self.fields)
            elif self.section == "myinfo":
                self.user_name = self.fields.get("user_name", "")
                self.export_type = self.fields.get("user_export_type", "")
                if self.export_type == "2":
                    raise _manga_export()
            self.section, self.fields = None, {}
        self.depth -= 1

    def close(self) -> None:
        return None

    def _add(self, fields: dict[str, str]) -> None:
        i = len(self.entries)
        entry = _entry(fields, f"anime[{i}]")
        first = self.first_seen.get(entry.anime_id)
        if first is not None:
            raise MalImportError(
                f"anime[{i}].series_animedb_id", f"anime {entry.anime_id} is listed twice (also anime[{first}])"
            )
        self.first_seen[entry.anime_id] = i
        self.entries.append(entry)

    def result(self) -> MalList:
        if self.saw_manga and not self.entries:
            raise _manga_export()
        return MalList(tuple(self.entries), self.user_name)


def _manga_export() -> MalImportError:
    return MalImportError("myinfo.user_export_type", "this is a manga list export; upload the anime list")


def _entry(fields: dict[str, str], path: str) -> MalEntry:
    anime_id = _integer(fields, "series_animedb_id", path, required=True)
    if not 1 <= anime_id <= MAX_ANIME_ID:
        raise MalImportError(f"{path}.series_animedb_id", f"{anime_id} is not a valid anime id (1..{MAX_ANIME_ID})")
    score = _integer(fields, "my_score", path)
    if not 0 <= score <= 10:
        raise MalImportError(f"{path}.my_score", f"{score} is outside 0-10 (0 = not scored)")
    status_text = fields.get("my_status") or "Plan to Watch"  # MAL's default when absent
    status = _STATUS_NAMES.get(" ".join(status_text.split()).casefold())
    if status is None:
        raise MalImportError(
            f"{path}.my_status",
            f"unknown status {_clip(status_text)!r}; expected Watching, Completed, On-Hold, Dropped or Plan to Watch",
        )
    return MalEntry(
        anime_id=anime_id,
        title=fields.get("series_title", ""),
        score=score or None,
        status=status,
        watched_episodes=_integer(fields, "my_watched_episodes", path),
    )


def _integer(fields: dict[str, str], tag: str, path: str, required: bool = False) -> int:
    """A non-negative decimal integer field; 0 when absent or empty unless required."""
    text = fields.get(tag, "")
    if not text:
        if required:
            raise MalImportError(f"{path}.{tag}", "missing")
        return 0
    if not _DIGITS.fullmatch(text):
        raise MalImportError(f"{path}.{tag}", f"{text[:40]!r} is not a non-negative integer")
    if len(text) > 10:  # also keeps int() away from huge digit strings
        raise MalImportError(f"{path}.{tag}", f"{text[:40]!r} is too large")
    return int(text)

"""Load the MyAnimeList files of `shared/data/mal` (its README describes them) into `MalData`.

Two layouts:
- full (`<data_dir>/*.csv.xz`): interactions are the CooperUnion ratings subset plus the MAL-2023
  anime lists (user ids offset by MAL2023_USER_OFFSET). The catalogue is the union of the 2021 MAL
  pages (richest: English/Japanese titles, synonyms, year, synopsis), the CooperUnion anime table,
  the 2023 basic table and the synopsis supplement; per field the first non-empty value wins in
  that order (so a synopsis comes from the 2021 pages, else the supplement). The supplement's 536
  anime that no other table has (2023-2026 TV shows: title, year, synopsis) are kept as the
  cold items they are. The review is the most helpful 2021 review. `members` is the 2021 count,
  else the 2016 CooperUnion count, else 0 (a popularity order, not one consistent snapshot).
- sample (`<data_dir>/sample/*.csv`): the 800-anime test subset. It has no English/Japanese titles,
  synonyms, year or popularity: those are ''/()/<NA>, and `members` is the number of sample
  interaction rows of the anime (every status), a popularity proxy valid within the sample only.

Validation is all-or-nothing: every file is read and checked before anything is returned, and the
first problem raises DataError naming the file, the 1-based data row and what is wrong. Only the
fields the models depend on are validated (ids, ratings, statuses); descriptive fields (episodes,
members, year) that do not parse become unknown. Duplicate (user, anime) rows within a file keep
the first row in file order. Interactions whose anime is not in the catalogue are kept (logged).
HTML entities in titles, synopses and reviews are decoded; synopsis source notes are stripped.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import lzma
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from anime2vec.data.confidence import MAL_STATUS_CODES, implicit_feedback
from anime2vec.data.text import strip_source_notes
from anime2vec.data.types import (
    CATALOG_COLUMNS,
    INTERACTION_COLUMNS,
    MAL2023_USER_OFFSET,
    RECS_COLUMNS,
    DataError,
    MalData,
)
from anime2vec.paths import default_data_dir

log = logging.getLogger(__name__)

FULL_FILES = {
    "ratings": "cooperunion_ratings_subset.csv.xz",
    "lists": "mal2023_animelists_sample.csv.xz",
    "meta": "anime_mal2021_meta.csv.xz",
    "cooperunion_anime": "anime_cooperunion.csv.xz",
    "basic_2023": "anime_2023_basic.csv.xz",
    "supplement": "anime_synopsis_supplement.csv.xz",
    "reviews": "anime_mal2021_reviews.csv.xz",
    "recs": "anime_mal2021_recs.csv.xz",
}
SAMPLE_FILES = {
    "ratings": "cooperunion_ratings_sample.csv",
    "lists": "mal2023_animelists_sample_small.csv",
    "anime": "anime_sample.csv",
    "reviews": "anime_reviews_sample.csv",
    "recs": "anime_recs_sample.csv",
}
RATING_VALUES = (-1, *range(1, 11))  # CooperUnion: -1 = in the list, unrated
SCORE_VALUES = tuple(range(0, 11))  # MAL-2023: 0 = not scored
TYPES = ("TV", "Movie", "OVA", "ONA", "Special", "Music")
_ENTITY = re.compile(r"&(?:[a-zA-Z]+|#\d+|#x[0-9a-fA-F]+);")


def load_mal(data_dir: Path | None = None, sample: bool = False) -> MalData:
    """Read, validate and join the MAL files; raises DataError on the first problem."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    start = time.perf_counter()
    reader = _CsvReader(root / "sample" if sample else root)
    data = _load_sample(reader) if sample else _load_full(reader)
    log.info(
        "loaded %s MAL data from %s in %.1fs: %d catalogue anime, %d interactions (%d positive), "
        "%d users, %d recommendation pairs",
        data.source,
        reader.directory,
        time.perf_counter() - start,
        len(data.catalog),
        len(data.interactions),
        int(data.interactions["positive"].sum()),
        data.interactions["user_id"].nunique(),
        len(data.recs),
    )
    return data


def _load_full(reader: _CsvReader) -> MalData:
    f = FULL_FILES
    interactions = _interactions([_ratings(reader, f["ratings"]), _lists(reader, f["lists"])])
    meta = reader.read(
        f["meta"],
        (
            "anime_id",
            "title",
            "title_english",
            "title_japanese",
            "title_synonyms",
            "type",
            "episodes",
            "aired",
            "premiered",
            "genres",
            "members",
            "synopsis",
        ),
        text=True,
    )
    cooperunion = reader.read(
        f["cooperunion_anime"], ("anime_id", "name", "genre", "type", "episodes", "members"), text=True
    )
    basic = reader.read(f["basic_2023"], ("anime_id", "Name", "Genres", "Episodes"), text=True)
    supplement = reader.read(f["supplement"], ("anime_id", "title", "synopsis", "source"), text=True)

    # "Spring 2009" for TV series, else the first year of "Apr 5, 2009 to Jul 4, 2010" / "1987".
    year = meta["premiered"].str.extract(r"(\d{4})")[0].fillna(meta["aired"].str.extract(r"(\d{4})")[0])
    # MAL joins synonyms with ", " (a synonym that itself contains ", " is split: rare, harmless).
    sources = [
        _catalog_source(
            meta,
            f["meta"],
            title=meta["title"],
            title_english=meta["title_english"],
            title_japanese=meta["title_japanese"],
            synonyms=meta["title_synonyms"].str.split(", "),
            genres=meta["genres"].str.split("|"),
            type=meta["type"],
            year=year,
            episodes=meta["episodes"],
            members=meta["members"],
            synopsis=meta["synopsis"],
        ),
        _catalog_source(
            cooperunion,
            f["cooperunion_anime"],
            title=cooperunion["name"],
            genres=cooperunion["genre"].str.split(", "),
            type=cooperunion["type"],
            episodes=cooperunion["episodes"],
            members=cooperunion["members"],
        ),
        _catalog_source(
            basic,
            f["basic_2023"],
            title=basic["Name"],
            genres=basic["Genres"].str.split(", "),
            episodes=basic["Episodes"],
        ),
        # Most supplement rows come from per-season files ("…:data/2024/fall.json"): that is the year.
        _catalog_source(
            supplement,
            f["supplement"],
            title=supplement["title"],
            synopsis=supplement["synopsis"],
            year=supplement["source"].str.extract(r"data/(\d{4})/")[0],
        ),
    ]
    catalog = _combine(sources)
    catalog["review"] = _reviews(reader, f["reviews"])
    return _finish(reader, "full", _catalog(catalog), interactions, _recs(reader, f["recs"]))


def _load_sample(reader: _CsvReader) -> MalData:
    f = SAMPLE_FILES
    interactions = _interactions([_ratings(reader, f["ratings"]), _lists(reader, f["lists"])])
    anime = reader.read(f["anime"], ("anime_id", "title", "type", "episodes", "genres", "synopsis"), text=True)
    catalog = _catalog_source(
        anime,
        f["anime"],
        title=anime["title"],
        genres=anime["genres"].str.split("|"),
        type=anime["type"],
        episodes=anime["episodes"],
        synopsis=anime["synopsis"],
    )
    catalog["members"] = interactions["anime_id"].value_counts().reindex(catalog.index).fillna(0)
    catalog["review"] = _reviews(reader, f["reviews"])
    return _finish(reader, "sample", _catalog(catalog), interactions, _recs(reader, f["recs"]))


class _CsvReader:
    """Reads CSVs of one directory, remembering the sha256 of every file's raw bytes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.sha256: dict[str, str] = {}

    def read(self, name: str, columns: tuple[str, ...], text: bool = False) -> pd.DataFrame:
        """The required `columns` of a file, row i at position i. text=True keeps every value a
        string ('' for empty) instead of letting pandas infer numbers and NaN."""
        path = self.directory / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(name, f"file not found in {self.directory}") from None
        self.sha256[name] = hashlib.sha256(raw).hexdigest()
        options = {"dtype": str, "keep_default_na": False} if text else {}
        try:
            frame = pd.read_csv(
                io.BytesIO(raw),
                compression="xz" if name.endswith(".xz") else None,
                usecols=lambda c: c in columns,
                **options,
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
            raise DataError(name, f"not a readable CSV file: {e}") from None
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(name, f"missing required column(s): {', '.join(missing)}")
        return frame[list(columns)]


def _integers(frame: pd.DataFrame, column: str, file: str) -> np.ndarray:
    """The column as int64; DataError at the first value that is not an integer."""
    values = frame[column]
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(np.int64)
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() | (numbers % 1 != 0)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = values.iloc[row]
        problem = f"{column} is empty" if pd.isna(value) or value == "" else f"{column} {value!r} is not an integer"
        raise DataError(file, problem, row=row + 1)
    return numbers.to_numpy(np.int64)


def _check_in(values: np.ndarray, allowed, column: str, file: str) -> None:
    bad = ~np.isin(values, np.asarray(allowed))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(file, f"{column} {values[row]} is not one of {list(allowed)}", row=row + 1)


def _check_unique(ids: np.ndarray, column: str, file: str) -> None:
    duplicated = pd.Series(ids).duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise DataError(file, f"duplicate {column} {ids[row]} (first at row {first + 1})", row=row + 1)


def _ratings(reader: _CsvReader, file: str) -> pd.DataFrame:
    """CooperUnion rows: rating 1-10 ("rated") or -1 ("listed")."""
    frame = reader.read(file, ("user_id", "anime_id", "rating"))
    users, anime, rating = (_integers(frame, c, file) for c in ("user_id", "anime_id", "rating"))
    _check_in(rating, RATING_VALUES, "rating", file)
    # MAL-2023 users are offset into [MAL2023_USER_OFFSET, ...): a CooperUnion id there would collide.
    outside = (users < 0) | (users >= MAL2023_USER_OFFSET)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataError(file, f"user_id {users[row]} is outside [0, {MAL2023_USER_OFFSET})", row=row + 1)
    listed = rating == -1
    return _rows(file, users, anime, np.where(listed, np.nan, rating), np.where(listed, "listed", "rated"))


def _lists(reader: _CsvReader, file: str) -> pd.DataFrame:
    """MAL-2023 anime-list rows: score 0 (unscored) or 1-10 and a watching status."""
    frame = reader.read(file, ("user_id", "anime_id", "score", "watching_status"))
    users, anime, score, status = (
        _integers(frame, c, file) for c in ("user_id", "anime_id", "score", "watching_status")
    )
    _check_in(score, SCORE_VALUES, "score", file)
    _check_in(status, tuple(MAL_STATUS_CODES), "watching_status", file)
    names = np.array([MAL_STATUS_CODES.get(code, "") for code in range(max(MAL_STATUS_CODES) + 1)], dtype=object)
    return _rows(file, users + MAL2023_USER_OFFSET, anime, np.where(score == 0, np.nan, score), names[status])


def _rows(file: str, users, anime, rating, status) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"user_id": users, "anime_id": anime, "rating": rating.astype(np.float32), "status": status, "source": file}
    )
    duplicated = frame.duplicated(["user_id", "anime_id"], keep="first")
    if duplicated.any():
        log.warning("%s: %d duplicate (user_id, anime_id) rows dropped, first kept", file, int(duplicated.sum()))
    return frame[~duplicated.to_numpy()]


def _interactions(parts: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(parts, ignore_index=True)
    confidence, positive = implicit_feedback(frame["rating"].to_numpy(), frame["status"].to_numpy())
    frame["confidence"], frame["positive"] = confidence, positive
    frame["status"] = frame["status"].astype(str)
    return frame[list(INTERACTION_COLUMNS)]


def _catalog_source(frame: pd.DataFrame, file: str, **columns: pd.Series) -> pd.DataFrame:
    """One catalogue table normalised to CATALOG_COLUMNS, indexed by anime_id, NA where empty."""
    ids = _integers(frame, "anime_id", file)
    _check_unique(ids, "anime_id", file)
    out = pd.DataFrame(index=pd.Index(ids, name="anime_id"))
    for name, values in columns.items():
        values = values.to_numpy(dtype=object)
        if name in ("synonyms", "genres"):
            values = [tuple(v for v in (s.strip() for s in parts) if v and v != "UNKNOWN") or None for parts in values]
        elif name in ("title", "title_english", "title_japanese", "synopsis"):
            values = [_unescape(v).strip() or None for v in values]
        elif name == "type":
            values = [v if v in TYPES else None for v in values]
        elif name in ("year", "episodes", "members"):
            values = pd.to_numeric(pd.Series(values), errors="coerce").astype("Int64").to_numpy()
        out[name] = pd.Series(values, index=out.index, dtype=object)
    if "synopsis" in out:
        out["synopsis"] = [(strip_source_notes(s) or None) if isinstance(s, str) else None for s in out["synopsis"]]
    return out


def _unescape(text: str) -> str:
    """Decode HTML entities; twice where the source escaped them twice ("&amp;quot;")."""
    text = html.unescape(text)
    return html.unescape(text) if _ENTITY.search(text) else text


def _combine(sources: list[pd.DataFrame]) -> pd.DataFrame:
    """Union of the tables; per field the first source with a value wins."""
    catalog = sources[0]
    for source in sources[1:]:
        catalog = catalog.combine_first(source)
    return catalog


def _catalog(frame: pd.DataFrame) -> pd.DataFrame:
    """CATALOG_COLUMNS with their contract types, sorted by anime_id."""

    def column(name: str) -> pd.Series:
        return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)

    def text(name: str) -> pd.Series:
        return column(name).fillna("").astype(str)

    def tuples(name: str) -> pd.Series:
        return pd.Series([v if isinstance(v, tuple) else () for v in column(name)], index=frame.index, dtype=object)

    def integers(name: str) -> pd.Series:
        return pd.to_numeric(column(name), errors="coerce").astype("Int64")

    catalog = pd.DataFrame(
        {
            "title": text("title"),
            "title_english": text("title_english"),
            "title_japanese": text("title_japanese"),
            "synonyms": tuples("synonyms"),
            "genres": tuples("genres"),
            "type": text("type"),
            "year": integers("year"),
            "episodes": integers("episodes"),
            "members": integers("members").fillna(0).astype(np.int64),
            "synopsis": text("synopsis"),
            "review": text("review"),
        },
        index=frame.index,
    )
    catalog.index = catalog.index.astype(np.int64)
    return catalog[list(CATALOG_COLUMNS)].sort_index()


def _reviews(reader: _CsvReader, file: str) -> pd.Series:
    frame = reader.read(file, ("anime_id", "text"), text=True)
    ids = _integers(frame, "anime_id", file)
    _check_unique(ids, "anime_id", file)
    return pd.Series([_unescape(t).strip() for t in frame["text"]], index=pd.Index(ids, name="anime_id"), dtype=object)


def _recs(reader: _CsvReader, file: str) -> pd.DataFrame:
    frame = reader.read(file, RECS_COLUMNS)
    return pd.DataFrame({c: _integers(frame, c, file) for c in RECS_COLUMNS})


def _finish(
    reader: _CsvReader, source: str, catalog: pd.DataFrame, interactions: pd.DataFrame, recs: pd.DataFrame
) -> MalData:
    unknown = ~interactions["anime_id"].isin(catalog.index)
    if unknown.any():
        log.info(
            "%d interactions (%d anime) are for anime not in the catalogue; kept",
            int(unknown.sum()),
            interactions.loc[unknown, "anime_id"].nunique(),
        )
    pairs = sorted(reader.sha256.items())
    fingerprint = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in pairs).encode()).hexdigest()
    return MalData(
        catalog=catalog, interactions=interactions, recs=recs, files=dict(pairs), fingerprint=fingerprint, source=source
    )

"""The in-memory shape of the MyAnimeList data every other module consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


class DataError(ValueError):
    """A data file is missing or malformed. Names the file, the row (1-based data row, header
    excluded; None when the problem is the whole file) and the problem."""

    def __init__(self, file: str, problem: str, row: int | None = None):
        self.file, self.row, self.problem = file, row, problem
        where = f"{file}, row {row}" if row is not None else file
        super().__init__(f"{where}: {problem}")


# Catalogue columns (index: anime_id, int64):
#   title (str), title_english (str, '' if none), title_japanese (str, '' if none),
#   synonyms (tuple[str, ...]), genres (tuple[str, ...]), type (str: TV/Movie/OVA/ONA/Special/Music/''),
#   year (Int64, <NA> if unknown), episodes (Int64), members (int64, popularity count, 0 if unknown),
#   synopsis (str, '' if none), review (str, '' if none: the most helpful MAL review)
CATALOG_COLUMNS = (
    "title",
    "title_english",
    "title_japanese",
    "synonyms",
    "genres",
    "type",
    "year",
    "episodes",
    "members",
    "synopsis",
    "review",
)

# Interaction columns (one row per (user_id, anime_id), deduplicated):
#   user_id (int64; CooperUnion ids as in the file, MAL-2023 list ids offset by MAL2023_USER_OFFSET),
#   anime_id (int64), rating (float32, NaN if unrated), status (str, see confidence.py),
#   confidence (float32, > 0 exactly for positives), positive (bool), source (str: file the row came from)
INTERACTION_COLUMNS = ("user_id", "anime_id", "rating", "status", "confidence", "positive", "source")
MAL2023_USER_OFFSET = 2_000_000

# Recommendation-pair columns: anime_id, rec_anime_id, num_users (int64)
RECS_COLUMNS = ("anime_id", "rec_anime_id", "num_users")


@dataclass(frozen=True)
class MalData:
    catalog: pd.DataFrame
    interactions: pd.DataFrame
    recs: pd.DataFrame
    # sha256 per file read (name -> hex) and one fingerprint over all of them
    files: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    source: str = "full"  # "full" or "sample"

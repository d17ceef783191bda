"""What the gateway checks of an AddAnime request before the ranker sees it.

Sizes are bounded here so that a request the gateway accepts always fits the ranker's message limit
(4 MiB, below the gateway's 8 MiB): a 7 MB synopsis gets INVALID_ARGUMENT naming `anime.synopsis`,
not the ranker's transport error. The limits are the ranker's own or stricter (services/ranker/catalogue_writes.py
MAX_TITLE 300, MAX_SYNOPSIS 20,000, MAX_EPISODES 10,000, 30 genres of 1-50 characters, 50 synonyms),
so nothing the gateway passes is refused for size downstream; what only the ranker can judge (year,
type) it still checks.
"""

from __future__ import annotations

from anime2vec.v1 import common_pb2

MAX_ANIME_ID = 2**31 - 1  # MyAnimeList ids and the ids the ranker assigns are far below
MAX_SYNOPSIS_CHARS = 20_000  # the ranker's MAX_SYNOPSIS
MAX_SYNONYMS, MAX_GENRES, MAX_GENRE_CHARS, MAX_TYPE_CHARS = 50, 30, 50, 16
MAX_EPISODES = 10_000  # the ranker's MAX_EPISODES


def anime_id_problem(anime_id: int) -> str | None:
    """Why `anime_id` cannot name an anime, or None."""
    if not 1 <= anime_id <= MAX_ANIME_ID:
        return f"must be in 1..{MAX_ANIME_ID}, got {anime_id}"
    return None


def anime_input_problems(
    a: common_pb2.AnimeInput, max_title_chars: int, max_synopsis_chars: int = MAX_SYNOPSIS_CHARS
) -> list[tuple[str, str]]:
    """(field, problem) for every bad field of an AnimeInput, field paths as in AddAnimeRequest."""
    bad: list[tuple[str, str]] = []

    def too_long(field: str, text: str, limit: int) -> None:
        if len(text) > limit:
            bad.append((field, f"{len(text):,} characters; at most {limit:,}"))

    if not a.title.strip():
        bad.append(("anime.title", "required"))
    else:
        too_long("anime.title", a.title, max_title_chars)
    too_long("anime.title_english", a.title_english, max_title_chars)
    if not a.synopsis.strip():
        bad.append(("anime.synopsis", "required: a new anime is recommendable only through its text"))
    else:
        too_long("anime.synopsis", a.synopsis, max_synopsis_chars)
    if len(a.synonyms) > MAX_SYNONYMS:
        bad.append(("anime.synonyms", f"at most {MAX_SYNONYMS} synonyms, got {len(a.synonyms)}"))
    else:
        for i, s in enumerate(a.synonyms):
            too_long(f"anime.synonyms[{i}]", s, max_title_chars)
    if len(a.genres) > MAX_GENRES:
        bad.append(("anime.genres", f"at most {MAX_GENRES} genres, got {len(a.genres)}"))
    else:
        for i, g in enumerate(a.genres):
            too_long(f"anime.genres[{i}]", g, MAX_GENRE_CHARS)
    too_long("anime.type", a.type, MAX_TYPE_CHARS)
    if a.HasField("episodes") and not 0 <= a.episodes <= MAX_EPISODES:
        bad.append(("anime.episodes", f"must be in 0..{MAX_EPISODES:,}, got {a.episodes}"))
    if a.members < 0:
        bad.append(("anime.members", f"must be >= 0, got {a.members}"))
    return bad

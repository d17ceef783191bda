"""The text an encoder reads for each anime, and the cleaning the raw synopses need.

A *recipe* names the catalogue fields that go into the text, in order, e.g. "title,genres,synopsis".
Each field becomes a short labelled sentence ("Title: …. Genres: a, b. Synopsis: …") so that an
encoder can tell a genre list from story text; empty fields are left out.
"""

from __future__ import annotations

import hashlib
import re

import pandas as pd

FIELDS = ("title", "genres", "synopsis", "review", "type")
RECIPES = {
    "synopsis": "synopsis",
    "default": "title,genres,synopsis",
    "full": "title,genres,synopsis,review",
}

# "[Written by MAL Rewrite]", "(Source: ANN)" and their misspellings end most MAL synopses. They are
# boilerplate shared by thousands of unrelated shows, so they would pull those shows together.
_SOURCE_NOTE = re.compile(
    r"[\[(]\s*(?:written\s+by\b[^\[\]()\n]*|(?:sources?|sourced|souce|sorce|sourse)\s*:[^\[\]()\n]*)[\])]",
    re.IGNORECASE,
)
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_source_notes(text: str) -> str:
    """Remove MAL source/credit notes ("[Written by MAL Rewrite]", "(Source: ANN)") from a synopsis.

    The text on either side of a note is rejoined with one space, or with nothing at a line break
    (some files glue a note between two sentences); the rest of the text, paragraphs included, is
    kept as it is.
    """
    pieces = [piece.strip(" \t") for piece in _SOURCE_NOTE.split(text)]
    joined = pieces[0]
    for piece in pieces[1:]:
        at_break = not joined or not piece or joined.endswith("\n") or piece.startswith("\n")
        joined += ("" if at_break else " ") + piece
    if len(pieces) > 1:
        joined = _BLANK_LINES.sub("\n\n", joined)
    return joined.strip()


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the key of the encoding cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_recipe(recipe: str) -> tuple[str, ...]:
    """The fields of a recipe: a RECIPES name or a comma list of FIELDS."""
    spec = RECIPES.get(recipe.strip(), recipe)
    fields = tuple(f.strip() for f in spec.split(",") if f.strip())
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ValueError(
            f"bad text recipe {recipe!r}: unknown field(s) {unknown}; valid fields: {', '.join(FIELDS)}; "
            f"named recipes: {', '.join(RECIPES)}"
        )
    if len(set(fields)) != len(fields):
        raise ValueError(f"bad text recipe {recipe!r}: a field is repeated")
    return fields


def build_texts(catalog: pd.DataFrame, recipe: str = RECIPES["default"]) -> pd.Series:
    """One text per catalogue row (index anime_id -> str); "" where every chosen field is empty."""
    fields = parse_recipe(recipe)
    render = {
        "title": _title,
        "genres": lambda row: ", ".join(row.genres),
        "synopsis": lambda row: row.synopsis,
        "review": lambda row: row.review,
        "type": lambda row: row.type,
    }
    label = {"title": "Title", "genres": "Genres", "synopsis": "Synopsis", "review": "Review", "type": "Type"}
    columns = {"title", "title_english"} if "title" in fields else set()
    columns |= {f for f in fields if f != "title"}
    texts = []
    for row in catalog[sorted(columns)].itertuples(index=False):
        parts = [_sentence(label[f], render[f](row)) for f in fields]
        texts.append(" ".join(p for p in parts if p))
    return pd.Series(texts, index=catalog.index, dtype=str, name="text")


def _title(row) -> str:
    english = row.title_english
    if english and english.casefold() != row.title.casefold():
        return f"{row.title} ({english})"
    return row.title


def _sentence(label: str, value: str) -> str:
    value = " ".join(value.split())
    if not value:
        return ""
    # "Kimi no Na wa. (Your Name.)" already ends a sentence; closing brackets/quotes don't count.
    ends_sentence = value.rstrip(")]\"'”’")[-1:] in (".", "!", "?", "…")
    return f"{label}: {value}" + ("" if ends_sentence else ".")

"""Encoder text recipes, synopsis source-note stripping and the cache key."""

import hashlib

import pandas as pd
import pytest

from anime2vec.data.text import FIELDS, RECIPES, build_texts, parse_recipe, strip_source_notes, text_hash


@pytest.fixture
def catalog():
    rows = {
        1: dict(
            title="Shingeki no Kyojin",
            title_english="Attack on Titan",
            genres=("Action", "Drama"),
            type="TV",
            synopsis="Humanity lives\ninside walls.",
            review="Great show",
        ),
        2: dict(title="Kimi no Na wa.", title_english="Your Name.", genres=(), type="Movie", synopsis="", review=""),
        3: dict(
            title="Cowboy Bebop",
            title_english="cowboy bebop",
            genres=("Sci-Fi",),
            type="",
            synopsis="Bounty hunters!",
            review="",
        ),
        4: dict(title="", title_english="", genres=(), type="", synopsis="", review=""),
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("anime_id")


def test_default_recipe_renders_labelled_sentences(catalog):
    texts = build_texts(catalog)
    assert texts.index.tolist() == [1, 2, 3, 4]
    assert texts[1] == (
        "Title: Shingeki no Kyojin (Attack on Titan). Genres: Action, Drama. Synopsis: Humanity lives inside walls."
    )
    # empty fields are skipped, no doubled full stop after a title that ends in one
    assert texts[2] == "Title: Kimi no Na wa. (Your Name.)"
    # an English title that only differs in case is not repeated
    assert texts[3] == "Title: Cowboy Bebop. Genres: Sci-Fi. Synopsis: Bounty hunters!"
    assert texts[4] == ""


def test_named_and_custom_recipes(catalog):
    assert build_texts(catalog, "full")[1].endswith("Synopsis: Humanity lives inside walls. Review: Great show.")
    assert build_texts(catalog, "synopsis")[1] == "Synopsis: Humanity lives inside walls."
    assert build_texts(catalog, "type, title")[2] == "Type: Movie. Title: Kimi no Na wa. (Your Name.)"
    assert parse_recipe(RECIPES["full"]) == ("title", "genres", "synopsis", "review")


def test_unknown_field_error_lists_the_valid_ones(catalog):
    with pytest.raises(ValueError) as err:
        build_texts(catalog, "title,plot")
    assert "'plot'" in str(err.value) and all(f in str(err.value) for f in FIELDS)


@pytest.mark.parametrize("recipe", ["", " , ", "title,title"])
def test_empty_or_repeated_recipes_are_rejected(catalog, recipe):
    with pytest.raises(ValueError, match="bad text recipe"):
        build_texts(catalog, recipe)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("A story.\n\n[Written by MAL Rewrite]", "A story."),
        ("A story.\n\n[Written By MAL Rewrite]\n", "A story."),
        ("A story.\n\n(Source: ANN)", "A story."),
        ("Glued.(Source: ANN)About the U.S. version.", "Glued. About the U.S. version."),
        ("A story.\n\n(Source: AniDB)\n\nNote: a pilot.", "A story.\n\nNote: a pilot."),
        ("Two parts (Source: ANN) then more.", "Two parts then more."),
        ("The (source of his power) stays.", "The (source of his power) stays."),
        ("No note here.", "No note here."),
    ],
)
def test_strip_source_notes(raw, clean):
    assert strip_source_notes(raw) == clean


def test_text_hash_is_sha256_of_utf8():
    assert text_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert text_hash("進撃") == hashlib.sha256("進撃".encode()).hexdigest()


def test_real_sample_texts():
    from anime2vec.data.loader import load_mal
    from anime2vec.paths import default_data_dir

    if not (default_data_dir() / "sample").is_dir():
        pytest.skip("MAL sample data not found")
    catalog = load_mal(sample=True).catalog
    texts = build_texts(catalog, "full")
    assert texts.index.equals(catalog.index) and texts.str.startswith("Title: ").all()
    assert texts.str.contains(" Synopsis: ").all() and texts.str.contains(" Review: ").sum() == 100
    assert texts[1].startswith(
        "Title: Cowboy Bebop. Genres: Action, Adventure, Comedy, Drama, Sci-Fi, Space. Synopsis: In the year 2071"
    )

"""Filters against the catalogue's genres, types and years (services/gateway/filters.py)."""

import pandas as pd

from anime2vec.v1 import common_pb2 as S
from services.gateway.filters import Facets, filter_problems

FRAME = pd.DataFrame(
    {
        "genres": [("Action", "Sci-Fi"), ("action",), ("Drama",)],
        "type": ["TV", "Movie", ""],
        "year": pd.array([None, None, None], dtype="Int64"),
    }
)


def test_facets_keep_the_usual_spelling_of_each_value():
    f = Facets.of(FRAME)
    assert f.genres == {"action": "Action", "drama": "Drama", "sci-fi": "Sci-Fi"}
    assert f.types == {"movie": "Movie", "tv": "TV"} and f.with_year == 0


def test_known_values_pass_in_any_case():
    found = filter_problems(
        S.Filters(include_genres=["SCI-FI"], exclude_genres=["drama"], types=["tv"]), Facets.of(FRAME)
    )
    assert (found.unknown, found.unanswerable) == ([], [])


def test_cold_start_only_is_left_to_the_ranker():
    """The snapshot does not know which anime are cold; the ranker answers FILTER_UNANSWERABLE."""
    found = filter_problems(S.Filters(cold_start_only=True), Facets.of(FRAME))
    assert (found.unknown, found.unanswerable, found.known_lists) == ([], [], {})


def test_unknown_values_name_the_field_and_the_closest_known_one():
    found = filter_problems(S.Filters(include_genres=["Actoin", "Cooking"], types=["Moive"]), Facets.of(FRAME))
    assert found.unknown == [
        ("options.filters.include_genres[0]", "unknown genre 'Actoin'; did you mean 'Action'?"),
        ("options.filters.include_genres[1]", "unknown genre 'Cooking'"),
        ("options.filters.types[0]", "unknown type 'Moive'; did you mean 'Movie'?"),
    ]
    assert found.known_lists == {"known_genres": "Action, Drama, Sci-Fi", "known_types": "Movie, TV"}


def test_filters_the_catalogue_cannot_answer():
    f = S.Filters(types=["OVA"], year_min=2000)
    found = filter_problems(f, Facets.of(FRAME))
    assert [field for field, _ in found.unanswerable] == ["options.filters.types[0]", "options.filters.year_min"]
    assert found.unknown == []  # OVA is a documented type, just not in this catalogue
    with_years = FRAME.assign(year=pd.array([2001, None, None], dtype="Int64"))
    assert [x for x, _ in filter_problems(f, Facets.of(with_years)).unanswerable] == ["options.filters.types[0]"]


def test_reversed_year_bounds_are_malformed_whatever_the_catalogue_holds():
    """year_min > year_max is the request's own fault (validate_options names it, in the ranker's words),
    so it is not reported as a filter this catalogue cannot answer: the answer must not depend on
    whether an anime with a year was added meanwhile."""
    from services.gateway.service import _Problems, validate_options

    f = S.Filters(year_min=2020, year_max=2010)
    assert filter_problems(f, Facets.of(FRAME)).unanswerable == []
    problems = _Problems()
    validate_options(S.RecommendOptions(filters=f), problems, max_limit=100)
    assert problems.invalid == [("options.filters.year_min", "2020 is after year_max 2010")]

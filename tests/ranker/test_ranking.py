"""Ranker helpers on arrays: the in-memory filter matches the Qdrant filter semantics; MMR."""

import numpy as np
import pytest

from anime2vec.index.base import SearchFilter
from anime2vec.serving.errors import ServiceError
from anime2vec.v1 import common_pb2
from services.ranker.ranking import Candidate, CatalogueFilter, mmr, search_filter, validate_options


@pytest.fixture
def filt():
    return CatalogueFilter(
        np.array([10, 20, 30, 40]),
        genres=[["Action", "Drama"], ["Comedy"], [], ["action"]],
        types=["TV", "Movie", "TV", "OVA"],
        years=[2001, None, 1995, 2010],
    )


def test_filter_semantics(filt):
    ids = lambda f: filt.item_ids[filt.mask(f)].tolist()  # noqa: E731
    assert ids(SearchFilter(include_genres=("ACTION",))) == [10, 40]  # case-insensitive, any-of
    assert ids(SearchFilter(exclude_genres=("comedy",))) == [10, 30, 40]
    assert ids(SearchFilter(types=("tv",))) == [10, 30]
    assert ids(SearchFilter(year_min=2000)) == [10, 40]  # unknown year dropped
    assert ids(SearchFilter(year_max=2005, exclude_ids=(10,))) == [30]
    assert ids(SearchFilter(include_genres=("Nope",))) == []


def test_cold_only_keeps_the_items_marked_cold_and_comes_from_cold_start_only():
    filt = CatalogueFilter(
        np.array([10, 20, 30, 40]),
        genres=[["Action"], ["Comedy"], ["Action"], []],
        types=["TV"] * 4,
        years=[None] * 4,
        cold=np.array([False, True, True, False]),
    )
    ids = lambda f: filt.item_ids[filt.mask(f)].tolist()  # noqa: E731
    assert ids(SearchFilter(cold_only=True)) == [20, 30]
    assert ids(SearchFilter(cold_only=True, include_genres=("action",), exclude_ids=(20,))) == [30]
    assert ids(SearchFilter()) == [10, 20, 30, 40]
    no_cold = CatalogueFilter(np.array([1, 2]), genres=[[], []], types=["TV", "TV"], years=[None, None])
    assert not no_cold.mask(SearchFilter(cold_only=True)).any()  # cold not given: nothing is cold
    flt = search_filter(common_pb2.Filters(cold_start_only=True, include_genres=[" Action "]), {7})
    assert flt == SearchFilter(include_genres=("Action",), exclude_ids=(7,), cold_only=True)
    assert search_filter(common_pb2.Filters(), set()).cold_only is False


def test_cold_start_only_is_unanswerable_only_without_any_cold_anime():
    from types import SimpleNamespace

    from google.rpc import error_details_pb2

    from anime2vec.serving_model.model import ItemMeta
    from services.ranker.retrieval import cold_unanswerable
    from services.ranker.state import has_cold

    def serving(cold, extra=()):
        return SimpleNamespace(
            filt=SimpleNamespace(cold=np.asarray(cold, bool)),
            version="v1",
            extra={a: ItemMeta(a, np.zeros(2, np.float32), {"cold": c}) for a, c in extra},
        )

    assert has_cold(serving([False, True]))
    assert not has_cold(serving([False, False], extra=[(5, False)]))  # a replaced warm anime stays warm
    assert has_cold(serving([False, False], extra=[(5, False), (100_000_001, True)]))  # an added one
    err = cold_unanswerable(serving([False]))
    assert err.code.name == "INVALID_ARGUMENT"
    bad = next(d for d in err.details if isinstance(d, error_details_pb2.BadRequest))
    info = next(d for d in err.details if isinstance(d, error_details_pb2.ErrorInfo))
    assert [v.field for v in bad.field_violations] == ["options.filters.cold_start_only"]
    assert info.reason == "FILTER_UNANSWERABLE"


def test_mmr_without_diversity_is_the_relevance_order_and_with_it_spreads_out():
    x = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.98, 0.2]], np.float32)
    cands = [Candidate(i, s, {}, x[i]) for i, s in enumerate([1.0, 0.95, 0.9, 0.85])]
    assert [c.anime_id for c in mmr(cands, 0.0)] == [0, 1, 2, 3]
    # with diversity the orthogonal item 2 moves ahead of the near-duplicate 1
    assert [c.anime_id for c in mmr(cands, 0.7)][:2] == [0, 2]
    # a disliked direction pushes similar items down
    assert [c.anime_id for c in mmr(cands, 0.0, dislikes=x[[1]])] == [0, 2, 1, 3]


def test_options_are_validated_with_the_field_named():
    with pytest.raises(ServiceError) as e:
        validate_options(
            common_pb2.RecommendOptions(
                limit=1000, diversity=1.5, filters=common_pb2.Filters(year_min=2010, year_max=2000)
            ),
            default_limit=10,
            max_limit=100,
            max_ids=10,
        )
    msg = e.value.message
    assert "options.limit" in msg and "options.diversity" in msg and "options.filters.year_min" in msg
    assert validate_options(common_pb2.RecommendOptions(), 10, 100, 10) == (10, 0.0)

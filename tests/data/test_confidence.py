"""Ratings and list statuses -> implicit feedback, checked against a hand-written table."""

import numpy as np
import pytest

from anime2vec.data.confidence import MAX_CONFIDENCE, implicit_feedback

NAN = float("nan")
# rating (NaN = none), status, expected confidence, expected positive
TABLE = [
    (NAN, "listed", 1.0, True),  # CooperUnion -1: in the list, unrated
    (10, "rated", 5.0, True),
    (8, "rated", 3.4, True),  # 1 + 3 * 0.8
    (6, "rated", 1.8, True),
    (5, "rated", 0.0, False),  # explicit dislike
    (1, "rated", 0.0, False),
    (NAN, "completed", 1.0, True),  # MAL-2023 score 0
    (9, "completed", 4.2, True),
    (5, "completed", 0.0, False),  # completed but scored 5: not a positive
    (NAN, "watching", 1.0, True),
    (7, "watching", 2.6, True),
    (NAN, "on_hold", 0.5, True),  # weak positive
    (10, "on_hold", 2.5, True),
    (4, "on_hold", 0.0, False),
    (NAN, "dropped", 0.0, False),
    (9, "dropped", 0.0, False),  # dropped is never a positive, whatever the score
    (NAN, "plan_to_watch", 0.0, False),  # intent, not consumption
    (10, "plan_to_watch", 0.0, False),
]


def test_hand_written_table():
    rating, status, conf, pos = map(list, zip(*TABLE))
    confidence, positive = implicit_feedback(np.array(rating, dtype=float), status)
    assert confidence.dtype == np.float32 and positive.dtype == bool
    np.testing.assert_allclose(confidence, conf, atol=1e-6)
    assert positive.tolist() == pos


@pytest.mark.parametrize("status", ["rated", "completed", "watching", "on_hold"])
def test_higher_rating_means_higher_confidence(status):
    confidence, positive = implicit_feedback(np.arange(6, 11, dtype=float), [status] * 5)
    assert positive.all() and (np.diff(confidence) > 0).all()
    assert confidence.max() <= MAX_CONFIDENCE


def test_positive_exactly_when_confidence_is_above_zero():
    rating = np.array([NAN, 3, 6, 10, NAN, 2, 8], dtype=float)
    status = ["listed", "rated", "rated", "completed", "dropped", "on_hold", "plan_to_watch"]
    confidence, positive = implicit_feedback(rating, status)
    assert ((confidence > 0) == positive).all()


@pytest.mark.parametrize(
    "rating, status, message",
    [
        ([7.0], ["finished"], "unknown status 'finished'"),
        ([11.0], ["completed"], "1..10"),
        ([NAN], ["rated"], "need a rating"),
        ([7.0], ["listed"], "must have none"),
    ],
)
def test_invalid_input_is_rejected(rating, status, message):
    with pytest.raises(ValueError, match=message):
        implicit_feedback(np.array(rating), status)

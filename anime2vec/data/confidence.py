"""How MyAnimeList ratings and list statuses become implicit feedback.

Weighted matrix factorisation (Hu, Koren & Volinsky 2008) needs, for every (user, anime) row, a
binary preference (is this a positive?) and a confidence (how sure are we?). Both interaction
sets are turned into that one form here, so every model sees the same definition.

A row is **positive iff the user consumed the show and did not dislike it**:

- An explicit rating r (1-10) of 6 or more ("Fine" and up on MAL's scale) is a positive with
  confidence `1 + (r - 5) * 0.8`: 1.8 for a 6 up to 5.0 for a 10, so a 10 weighs almost three
  times a 6.
- A rating of 5 or less is an explicit dislike and never a positive, whatever the status
  (a Completed show scored 5 is not a positive).
- Consumed but unrated (CooperUnion rating -1 "listed", MAL-2023 score 0 while Watching or
  Completed) is a positive with confidence 1.0: the user chose it, but said nothing more.
- MAL-2023 On-Hold is a weak positive: half the confidence it would have otherwise
  (0.5 unrated, 0.9 to 2.5 rated 6-10).
- MAL-2023 Dropped (the user gave up on it) and Plan to Watch (intent, not consumption) are never
  positives, whatever the score.

Positives therefore have confidence in [0.5, 5.0]; every other row has confidence 0 and
positive=False. Non-positive rows stay in the interaction table because serving needs the
dislikes (never recommend a dropped or low-rated show back).

`status` values: "rated" / "listed" (CooperUnion rows with / without a rating), "watching",
"completed", "on_hold", "dropped", "plan_to_watch" (MAL-2023 `watching_status` 1, 2, 3, 4, 6).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STATUSES = ("rated", "listed", "watching", "completed", "on_hold", "dropped", "plan_to_watch")
# MAL anime-list `watching_status` codes (5 is unused by MAL).
MAL_STATUS_CODES = {1: "watching", 2: "completed", 3: "on_hold", 4: "dropped", 6: "plan_to_watch"}
# Statuses that mean the user watched (some of) the show without giving up on it.
CONSUMED = ("rated", "listed", "watching", "completed", "on_hold")

LIKE_MIN_RATING = 6  # lowest rating that counts as liking a show
RATING_STEP = 0.8  # confidence gained per rating point above 5
UNRATED_CONFIDENCE = 1.0  # consumed, no rating
ON_HOLD_WEIGHT = 0.5  # multiplier for On-Hold rows
MAX_CONFIDENCE = 1.0 + (10 - 5) * RATING_STEP  # a 10: 5.0


def implicit_feedback(rating, status) -> tuple[np.ndarray, np.ndarray]:
    """(confidence float32, positive bool) per row, following the module docstring.

    rating: ratings 1-10, NaN where the row has none. status: one of STATUSES per row.
    Raises ValueError on an unknown status, a rating outside 1-10, or a "rated" row without a
    rating / a "listed" row with one.
    """
    rating = np.asarray(rating, dtype=np.float32)
    # Status positions in STATUSES (-1 if unknown) make the tests integer comparisons: fast on a
    # million rows.
    codes = pd.Index(STATUSES).get_indexer(np.asarray(status, dtype=object))
    if len(codes) != len(rating):
        raise ValueError(f"rating and status lengths differ: {len(rating)} != {len(codes)}")
    if (codes < 0).any():
        bad = np.asarray(status, dtype=object)[np.flatnonzero(codes < 0)[0]]
        raise ValueError(f"unknown status {bad!r}; valid: {', '.join(STATUSES)}")
    rated = ~np.isnan(rating)
    if ((rating[rated] < 1) | (rating[rated] > 10)).any():
        raise ValueError("ratings must be in 1..10 (NaN for none)")
    is_rated, is_listed = codes == STATUSES.index("rated"), codes == STATUSES.index("listed")
    if (is_rated & ~rated).any() or (is_listed & rated).any():
        raise ValueError('"rated" rows need a rating and "listed" rows must have none')

    consumed = np.isin(codes, [STATUSES.index(s) for s in CONSUMED])
    positive = consumed & ~(rated & (rating < LIKE_MIN_RATING))
    base = np.where(rated, 1.0 + (rating - 5.0) * RATING_STEP, UNRATED_CONFIDENCE)
    weight = np.where(codes == STATUSES.index("on_hold"), ON_HOLD_WEIGHT, 1.0)
    confidence = np.where(positive, base * weight, 0.0).astype(np.float32)
    return confidence, positive

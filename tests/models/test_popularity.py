"""Popularity: one ranking for everybody, by training positives, ties broken in a seeded random order."""

import numpy as np
import scipy.sparse as sp

from anime2vec.models.base import Queries
from anime2vec.models.popularity import Popularity


def test_ranks_by_count_for_every_query_kind_with_seeded_ties():
    # positives per item: [1, 3, 0, 3, 1]; confidence values do not matter, only positives
    train = sp.csr_matrix(np.array([[9, 1, 0, 1, 0], [0, 1, 0, 1, 0], [0, 2, 0, 5, 1]], dtype=np.float32))
    m = Popularity(seed=0).fit(train)
    np.testing.assert_array_equal(m.counts, [1, 3, 0, 3, 1])
    first = None
    for q in (Queries.of_users([0, 2]), Queries.of_liked([[2], [0, 4]])):
        idx, _ = m.recommend(q, k=5)
        assert (idx == idx[0]).all()  # the same list for everybody
        # item 2 has no positive: no popularity to rank it by, never recommended (padding instead)
        assert set(idx[0, :2]) == {1, 3} and set(idx[0, 2:4]) == {0, 4} and idx[0, 4] == -1
        first = idx[0] if first is None else first
        np.testing.assert_array_equal(idx[0], first)
    # excluding history still follows the same order
    idx, _ = m.recommend(Queries.of_users([0]), k=3, exclude=train[[0]])
    np.testing.assert_array_equal(idx[0], [i for i in first if i not in (0, 1, 3, -1)] + [-1, -1])
    np.testing.assert_array_equal(m.scorable(np.arange(5)), [True, True, False, True, True])


def test_ties_do_not_follow_the_item_index():
    # 200 items tied at one positive each: their order must not be the index order (MAL ids track
    # age), and it is the same for the same seed
    train = sp.csr_matrix((np.ones(200, np.float32), (np.arange(200) % 3, np.arange(200))), shape=(3, 200))
    idx, _ = Popularity(seed=0).fit(train).recommend(Queries.of_users([0]), k=200)
    assert sorted(idx[0].tolist()) == list(range(200)) and not np.array_equal(idx[0], np.arange(200))
    np.testing.assert_array_equal(Popularity(seed=0).fit(train).recommend(Queries.of_users([0]), k=200)[0][0], idx[0])
    assert not np.array_equal(Popularity(seed=1).fit(train).recommend(Queries.of_users([0]), k=200)[0][0], idx[0])


def test_items_nobody_watched_score_in_a_seeded_order_but_are_never_recommended():
    # 200 items nobody watched (cold): their scores are still tie-broken at random, not by index
    # (a protocol that ranks unscorable items too, like CiteULike's, sees a random order)
    m = Popularity(seed=0).fit(sp.csr_matrix((3, 200), dtype=np.float32))
    s = m.score(Queries.of_users([0]), np.arange(200))[0]
    assert len(set(s.tolist())) == 200 and not np.array_equal(np.argsort(-s), np.arange(200))
    assert not m.scorable(np.arange(200)).any()
    idx, scores = m.recommend(Queries.of_users([0]), k=200)
    assert (idx == -1).all() and np.isneginf(scores).all()


def test_scores_stay_distinct_in_float32_at_large_counts():
    # 3 items tied at 200,000 positives each: a count plus a tiny epsilon would collapse in float32
    n_users = 200_000
    train = sp.csr_matrix(np.ones((n_users, 3), dtype=np.float32))
    s = Popularity().fit(train).score(Queries.of_users([0]), np.arange(3))
    assert s.dtype == np.float32 and len(set(s[0].tolist())) == 3

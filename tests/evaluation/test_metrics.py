"""Every metric against numbers worked out by hand."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.evaluation import metrics as M

# two queries; -1 pads the first list
RANKED = np.array([[3, 1, 4, -1], [2, 5, 6, 7]])
RELEVANT = [np.array([1, 9]), np.array([7])]
L2, L5 = 1 / math.log2(3), 1 / math.log2(5)


def test_recall_at_k_by_hand():
    # q0 finds 1 of {1, 9} at rank 2; q1 finds 7 at rank 4
    assert M.recall_at_k(RANKED, RELEVANT, 1) == pytest.approx(0.0)
    assert M.recall_at_k(RANKED, RELEVANT, 2) == pytest.approx((0.5 + 0) / 2)
    assert M.recall_at_k(RANKED, RELEVANT, 4) == pytest.approx((0.5 + 1) / 2)
    # DropoutNet's denominator is |relevant| even when k < |relevant|
    assert M.recall_at_k(np.array([[1]]), [np.array([1, 2, 3])], 1) == pytest.approx(1 / 3)


def test_sparse_truth_equals_index_lists_and_is_not_modified():
    truth = sp.csr_matrix(np.array([[0, 2.0, 0, 0, 0, 0, 0, 0, 0, 5.0], [0, 0, 0, 0, 0, 0, 0, 3.0, 0, 0]]))
    before = truth.toarray().copy()
    assert M.recall_at_k(RANKED, truth, 4) == pytest.approx(0.75)
    assert M.mrr(RANKED, truth) == M.mrr(RANKED, RELEVANT)
    np.testing.assert_array_equal(truth.toarray(), before)


def test_recall_curve_by_hand_and_flat_past_the_list():
    np.testing.assert_allclose(M.recall_curve(RANKED, RELEVANT, 5), [0, 0.25, 0.25, 0.75, 0.75])


def test_ndcg_by_hand():
    # q0: hit at rank 2, ideal = two hits on top; q1: no hit in the top 2
    assert M.ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx((L2 / (1 + L2) + 0) / 2)
    # q1 at k=4: hit at rank 4, ideal = one hit at rank 1
    assert M.ndcg_at_k(RANKED, RELEVANT, 4) == pytest.approx((L2 / (1 + L2) + L5) / 2)
    # a perfect list scores 1
    assert M.ndcg_at_k(np.array([[7, 1, 0]]), [np.array([1, 7])], 3) == pytest.approx(1.0)


def test_mrr_by_hand():
    assert M.mrr(RANKED, RELEVANT) == pytest.approx((1 / 2 + 1 / 4) / 2)
    # no relevant item in the list counts 0
    assert M.mrr(np.array([[0, 1], [2, 3]]), [np.array([1]), np.array([9])]) == pytest.approx(0.5 / 2)


def test_padding_never_hits():
    assert M.recall_at_k(np.array([[-1, -1]]), [np.array([0])], 2) == 0.0


def test_query_without_relevant_items_is_an_error():
    with pytest.raises(ValueError, match="no relevant item"):
        M.recall_at_k(RANKED, [np.array([1]), np.array([], dtype=np.int64)], 2)
    with pytest.raises(ValueError, match="rows"):
        M.mrr(RANKED, [np.array([1])])
    with pytest.raises(ValueError, match="k must be"):
        M.ndcg_at_k(RANKED, RELEVANT, 0)


def test_catalogue_coverage_by_hand():
    # items 1..7 appear (padding ignored): 7 of 10 candidates
    assert M.catalogue_coverage(RANKED, 10) == pytest.approx(0.7)
    assert M.catalogue_coverage(np.array([[0, 1], [1, 0]]), 4) == pytest.approx(0.5)


def test_popularity_percentile_by_hand():
    # popularity [0, 10, 10, 5]: mid-ranks 1, 3.5, 3.5, 2 -> percentiles 12.5, 75, 75, 37.5
    pop = np.array([0, 10, 10, 5])
    np.testing.assert_allclose(M.popularity_percentiles(pop), [12.5, 75, 75, 37.5])
    # list [1, 3] -> (75 + 37.5) / 2; list [0, pad] -> 12.5
    assert M.popularity_percentile(np.array([[1, 3], [0, -1]]), pop) == pytest.approx((56.25 + 12.5) / 2)


def test_intra_list_diversity_by_hand():
    vecs = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    d45 = 1 - 1 / math.sqrt(2)
    recs = np.array([[0, 1, 2], [0, 3, -1], [2, -1, -1]])
    # list 0: pairs (0,1)=1, (0,2)=d45, (1,2)=d45; list 1: zero vector -> cosine 0 -> 1;
    # list 2 has one item: no pair, left out
    expected = ((1 + 2 * d45) / 3 + 1) / 2
    assert M.intra_list_diversity(recs, vecs) == pytest.approx(expected)
    # cosine ignores vector length
    assert M.intra_list_diversity(recs, vecs * np.array([[3], [0.5], [7], [1]])) == pytest.approx(expected)
    assert math.isnan(M.intra_list_diversity(np.array([[2, -1]]), vecs))


def test_diversity_matches_a_brute_force_pairwise_mean():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(30, 5))
    recs = np.stack([rng.choice(30, 6, replace=False) for _ in range(8)])
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    per_list = []
    for r in recs:
        sims = unit[r] @ unit[r].T
        per_list.append(np.mean([1 - sims[a, b] for a in range(6) for b in range(a + 1, 6)]))
    assert M.intra_list_diversity(recs, vecs) == pytest.approx(np.mean(per_list))


def test_mrr_from_scores_by_hand():
    ninf = -np.inf
    scores = np.array(
        [
            [0.9, 0.5, 0.7, 0.1],  # relevant {1, 3}: 0.9, 0.7 ahead of 0.5 -> rank 3
            [0.2, 0.2, 0.2, 0.2],  # all tied, relevant {2}: columns 0, 1 ahead -> rank 3
            [ninf, 0.3, 0.1, 0.3],  # relevant {0} excluded -> 0
            [ninf, 0.3, 0.4, 0.3],  # relevant {1, 3} tied: the first column wins; 0.4 ahead -> rank 2
        ]
    )
    rel = np.array([[0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1]], dtype=bool)
    assert M.mrr_from_scores(scores, rel) == pytest.approx((1 / 3 + 1 / 3 + 0 + 1 / 2) / 4)
    with pytest.raises(ValueError, match="no relevant"):
        M.mrr_from_scores(scores[:1], np.zeros((1, 4), bool))


def test_mrr_from_scores_equals_mrr_of_the_stable_full_ranking():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 30)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    rel = rng.random(scores.shape) < 0.1
    rel[np.arange(50), rng.integers(0, 30, 50)] = True
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), order, -1)
    relevant = [np.flatnonzero(r) for r in rel]
    assert M.mrr_from_scores(scores, rel) == pytest.approx(M.mrr(ranked, relevant))

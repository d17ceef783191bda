"""Graph features on hand-made graphs whose results can be computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anime2vec.features.graph import graph_preference_features, neighbour_mean, propagate, rec_graph

# items 10, 20, 30, 40; pairs 10–20 (both directions submitted), 20–30; 40 has none; 99 unknown
RECS = pd.DataFrame(
    {"anime_id": [10, 20, 20, 10, 99], "rec_anime_id": [20, 10, 30, 10, 10], "num_users": [3, 4, 1, 50, 7]}
)
IDS = np.array([10, 20, 30, 40])


def test_rec_graph_is_symmetric_log_weighted_and_drops_self_and_unknown_pairs():
    a = rec_graph(RECS, IDS).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = np.log1p(3 + 4)  # both directions summed
    expected[1, 2] = expected[2, 1] = np.log1p(1)
    np.testing.assert_allclose(a, expected, rtol=1e-6)  # 10→10 self-pair and 99→10 dropped


def test_min_users_drops_weak_pairs():
    a = rec_graph(RECS, IDS, min_users=2).toarray()
    assert a[1, 2] == 0 and a[0, 1] > 0


def test_propagate_one_hop_by_hand():
    a = rec_graph(pd.DataFrame({"anime_id": [10, 20], "rec_anime_id": [20, 30], "num_users": [1, 1]}), IDS)
    x = np.array([[1.0, 0], [0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    h = propagate(x, a, alpha=0.5, hops=1)
    # equal weights: Â row 10 = [0,1,0,0]; row 20 = [.5,0,.5,0]; row 30 = [0,1,0,0]; 40 no edges
    np.testing.assert_allclose(h[0], 0.5 * x[0] + 0.5 * x[1])
    np.testing.assert_allclose(h[1], 0.5 * x[1] + 0.5 * (0.5 * x[0] + 0.5 * x[2]))
    np.testing.assert_allclose(h[2], 0.5 * x[2] + 0.5 * x[1])
    np.testing.assert_allclose(h[3], x[3])  # isolated: unchanged
    h2 = propagate(x, a, alpha=0.5, hops=2)
    np.testing.assert_allclose(h2[0], 0.5 * x[0] + 0.5 * h[1], rtol=1e-6)


def test_propagate_rejects_alpha_one():
    with pytest.raises(ValueError):
        propagate(np.ones((4, 2)), rec_graph(RECS, IDS), alpha=1.0)


def test_neighbour_mean_uses_known_neighbours_only():
    a = rec_graph(RECS, IDS)
    V = np.array([[1.0, 0], [0, 1.0], [3.0, 3.0], [9.0, 9.0]])
    known = np.array([True, True, False, True])
    mean, weight = neighbour_mean(V, a, known)
    np.testing.assert_allclose(mean[0], V[1])  # 10's only neighbour: 20
    np.testing.assert_allclose(mean[1], V[0])  # 20: 10 known, 30 not
    np.testing.assert_allclose(mean[2], V[1])  # cold 30 gets 20's factors
    np.testing.assert_allclose(mean[3], 0)  # no neighbours
    np.testing.assert_allclose(weight, [np.log1p(7), np.log1p(7), np.log1p(1), 0], rtol=1e-6)
    f = graph_preference_features(V, a, known)
    assert f.shape == (4, 3)
    np.testing.assert_allclose(f[:, 2], np.log1p(weight), rtol=1e-6)


def test_neighbour_mean_weights_by_edge_strength():
    recs = pd.DataFrame({"anime_id": [30, 30], "rec_anime_id": [10, 20], "num_users": [1, 19]})
    mean, _ = neighbour_mean(
        np.array([[1.0], [0.0], [0.0], [0.0]]), rec_graph(recs, IDS), np.array([True, True, False, False])
    )
    np.testing.assert_allclose(mean[2], [np.log(2) / (np.log(2) + np.log(20))], rtol=1e-6)

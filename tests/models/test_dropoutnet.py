"""DropoutNet: cold items enter through text alone; favourites-only users through the transform."""

import numpy as np
import pytest

from anime2vec.models.base import Queries
from anime2vec.models.dropoutnet import DropoutNet, DropoutNetConfig
from anime2vec.models.wmf import WMF

from .synthetic import two_cluster_world


@pytest.fixture(scope="module")
def world():
    return two_cluster_world()


@pytest.fixture(scope="module")
def model(world):
    wmf = WMF(factors=8, regularization=0.1, alpha=5.0, iterations=10, seed=0)
    cfg = DropoutNetConfig(
        hidden=(32,), out_dim=16, epochs=40, batch_users=16, top_pool=10, n_top=8, n_rand=8, lr=3e-3, seed=0
    )
    return DropoutNet(world["content"], wmf, cfg, device="cpu").fit(world["train"])


def test_wmf_cannot_rank_cold_items(model, world):
    assert np.all(model.wmf.V[world["cold"]] == 0)


def test_cold_items_are_ranked_by_their_text(model, world):
    cold, ic, uc = world["cold"], world["item_cluster"], world["user_cluster"]
    s = model.score(Queries.of_users(np.arange(len(uc))), cold)
    same = ic[cold][None, :] == uc[:, None]
    # every user scores the cold items of their own taste above the others
    assert np.all(s[same].reshape(len(uc), -1).min(axis=1) > s[~same].reshape(len(uc), -1).max(axis=1))


def test_item_tower_with_no_preference_equals_the_served_cold_vectors(model, world):
    cold = world["cold"]
    np.testing.assert_allclose(model.item_tower(None, world["content"][cold]), model.item_emb[cold], atol=1e-5)


def test_favourites_query_prefers_its_own_cluster_including_cold_items(model, world):
    ic, cold = world["item_cluster"], world["cold"]
    liked = [np.flatnonzero((ic == 0))[:3]]
    recs, _ = model.recommend(
        Queries.of_liked(liked), k=10, exclude=Queries.of_liked(liked).history_matrix(model.train)
    )
    assert np.mean(ic[recs[0]] == 0) >= 0.9
    # a query made only of cold items still works (content-only user)
    only_cold = [cold[ic[cold] == 1][:2]]
    recs, _ = model.recommend(Queries.of_liked(only_cold), k=10)
    assert np.mean(ic[recs[0]] == 1) >= 0.9


def test_training_reduces_the_reconstruction_error(model):
    mse = [h["train_mse"] for h in model.history]
    assert mse[-1] < 0.5 * mse[0]


def test_state_round_trip_gives_identical_scores(model, world):
    again = DropoutNet.from_state(model.state(), model.config, world["content"], model.wmf, device="cpu")
    q = Queries.of_users(np.arange(10))
    np.testing.assert_allclose(again.score(q, np.arange(40)), model.score(q, np.arange(40)), rtol=1e-5, atol=1e-5)


def test_validation_selects_the_best_epoch(world):
    wmf = WMF(factors=8, iterations=5, seed=0)
    cfg = DropoutNetConfig(
        hidden=(16,), out_dim=8, epochs=6, patience=10, batch_users=16, top_pool=5, n_top=4, n_rand=4, seed=0
    )
    calls = []
    score = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.1, 6: 0.0}  # epoch 2 is best by construction

    def validation(m):
        calls.append(1)
        return score[len(calls)]

    m = DropoutNet(world["content"], wmf, cfg, device="cpu").fit(world["train"], validation=validation)
    assert m.best_epoch == 2 and len(m.history) == 6


def test_serving_vectors_rank_exactly_like_score_including_the_cold_offset(model, world):
    q, items = Queries.of_users(np.arange(12)), np.arange(40)
    try:
        model.cold_bias = 0.7
        served = (
            model.serving_user_vectors(model.user_tower(q))
            @ model.serving_item_vectors(model.item_emb, model.cold_items).T
        )
        np.testing.assert_allclose(served, model.score(q, items), rtol=1e-5, atol=1e-5)
        # the offset lifts exactly the cold items
        lifted = model.score(q, items) - (model.user_tower(q) @ model.item_emb.T)
        np.testing.assert_allclose(lifted[:, world["cold"]], 0.7, atol=1e-5)
        assert np.all(lifted[:, :32] == 0)
    finally:
        model.cold_bias = 0.0


def test_calibration_picks_the_offset_the_validation_prefers(model):
    try:
        chosen = model.calibrate(lambda m: -abs(m.cold_bias - 0.5), grid=(0.0, 0.1, 0.2))
        scale = model.calibration[1]["bias"] / 0.1
        assert [c["bias_std"] for c in model.calibration] == [0.0, 0.1, 0.2]
        best = min((abs(g * scale - 0.5), g * scale) for g in (0.0, 0.1, 0.2))[1]
        assert chosen == pytest.approx(best) and model.cold_bias == pytest.approx(best)
    finally:
        model.cold_bias = 0.0


def test_small_batches_in_numpy_equal_the_torch_forward_and_follow_weight_changes(model, world):
    """Serving computes one row at a time in numpy (Tower.forward_numpy); it must be the trained
    tower, BatchNorm's running statistics included, and must not serve stale weights."""
    import copy

    import torch

    from anime2vec.models.dropoutnet import SMALL_BATCH

    tower = copy.deepcopy(model.f_u).eval()
    x = np.random.default_rng(0).standard_normal((SMALL_BATCH, tower.net[0].in_features)).astype(np.float32)
    with torch.inference_mode():
        want = tower(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tower.forward_numpy(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an optimiser step or load_state_dict changes the weights in place
        tower.net[0].weight.mul_(-1.0)
        tower.net[1].running_mean.add_(0.5)
        want = tower(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tower.forward_numpy(x), want, rtol=1e-5, atol=1e-5)
    # the model's own small- and large-batch paths agree (numpy below SMALL_BATCH rows, torch above)
    content = world["content"][: 3 * SMALL_BATCH]
    big = model.item_tower(None, content)
    small = np.concatenate([model.item_tower(None, content[i : i + 1]) for i in range(len(content))])
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-5)

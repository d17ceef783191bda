"""The served blend: one dot product that ranks exactly like its score, tuned on validation."""

import numpy as np
import pytest

from anime2vec.models.base import Queries
from anime2vec.models.dropoutnet import DropoutNet, DropoutNetConfig
from anime2vec.models.hybrid import Hybrid, Weights
from anime2vec.models.wmf import WMF

from .synthetic import two_cluster_world


@pytest.fixture(scope="module")
def world():
    return two_cluster_world()


@pytest.fixture(scope="module")
def hybrid(world):
    wmf = WMF(factors=8, regularization=0.1, alpha=5.0, iterations=10, seed=0, threads=1)
    cfg = DropoutNetConfig(hidden=(32,), out_dim=16, epochs=25, batch_users=16, top_pool=10, n_top=8,
                           n_rand=8, lr=3e-3, seed=0)
    dn = DropoutNet(world["content"], wmf, cfg, device="cpu").fit(world["train"])
    return Hybrid(dn).fit(world["train"])


def test_serving_vectors_are_the_score_for_both_request_types(hybrid):
    items = np.arange(40)
    hybrid.users, hybrid.favourites = Weights(1.0, 0.5, 0.25, 1.5), Weights(0.5, 2.0, 1.0, 0.5)
    for q in (Queries.of_users(np.arange(10)), Queries.of_liked([[0, 2, 4], [1, 3]])):
        w = hybrid.weights_for(q)
        served = hybrid.serving_user_vectors(*hybrid.parts(q), w) @ hybrid.serving_item_vectors(items).T
        np.testing.assert_allclose(served, hybrid.score(q, items), rtol=1e-5, atol=1e-5)


def test_the_terms_add_up_as_documented(hybrid, world):
    q, items = Queries.of_users(np.arange(6)), np.arange(40)
    uh, u, phi_u = hybrid.parts(q)
    s = hybrid.scales
    hybrid.users = Weights(a=1.0, b=0.0, c=0.0, d=0.0)
    np.testing.assert_allclose(hybrid.score(q, items), uh @ hybrid.dn.item_emb.T / s.dn, rtol=1e-4, atol=1e-5)
    hybrid.users = Weights(a=0.0, b=1.0, c=0.0, d=2.0)
    expect = u @ hybrid.dn.wmf.V.T / s.wmf + 2.0 * hybrid.dn.cold_items[None, :]
    np.testing.assert_allclose(hybrid.score(q, items), expect, rtol=1e-4, atol=1e-5)
    assert np.all(hybrid.dn.wmf.V[world["cold"]] == 0)   # cold items only get the offset from WMF


def test_tuning_climbs_to_what_validation_rewards(hybrid):
    hybrid.users, hybrid.favourites = Weights(), Weights()
    # a validation score that peaks at a = 2, c = 0 and d = 3 for users
    def evaluate(model, kind):
        w = model.users if kind == "users" else model.favourites
        return -abs(w.a - 2.0) - abs(w.c) - abs(w.d - 3.0)
    hybrid.tune(evaluate)
    assert hybrid.users.as_dict() == {"a": 2.0, "b": 1.0, "c": 0.0, "d": 3.0}
    assert hybrid.tuning["users"]["val"] == pytest.approx(0.0)


def test_params_round_trip(hybrid):
    again = Hybrid.from_params(hybrid.dn, hybrid.params(), hybrid.train)
    q = Queries.of_liked([[0, 4, 8]])
    np.testing.assert_allclose(again.score(q, np.arange(40)), hybrid.score(q, np.arange(40)), rtol=1e-6)

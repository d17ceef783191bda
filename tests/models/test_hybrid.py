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
    rng = np.random.default_rng(1)
    tfidf = world["content"] @ rng.normal(size=(world["content"].shape[1], 6)).astype(np.float32)
    return Hybrid(dn, tfidf=tfidf).fit(world["train"])


def test_serving_vectors_are_the_score_for_both_request_types(hybrid):
    items = np.arange(40)
    hybrid.users, hybrid.favourites = Weights(1.0, 0.5, 0.25, 1.5, 0.5), Weights(0.5, 2.0, 1.0, 0.5, 1.0)
    for q in (Queries.of_users(np.arange(10)), Queries.of_liked([[0, 2, 4], [1, 3]])):
        w = hybrid.weights_for(q)
        served = hybrid.serving_user_vectors(*hybrid.parts(q), w) @ hybrid.serving_item_vectors(items).T
        np.testing.assert_allclose(served, hybrid.score(q, items), rtol=1e-5, atol=1e-5)


def test_the_terms_add_up_as_documented(hybrid, world):
    q, items = Queries.of_users(np.arange(6)), np.arange(40)
    uh, u, phi_u, psi_u = hybrid.parts(q)
    s = hybrid.scales
    hybrid.users = Weights(a=1.0, b=0.0, c=0.0, d=0.0, e=0.0)
    np.testing.assert_allclose(hybrid.score(q, items), uh @ hybrid.dn.item_emb.T / s.dn, rtol=1e-4, atol=1e-5)
    hybrid.users = Weights(a=0.0, b=1.0, c=0.0, d=2.0, e=0.0)
    expect = u @ hybrid.dn.wmf.V.T / s.wmf + 2.0 * hybrid.dn.cold_items[None, :]
    np.testing.assert_allclose(hybrid.score(q, items), expect, rtol=1e-4, atol=1e-5)
    hybrid.users = Weights(a=0.0, b=0.0, c=0.0, d=0.0, e=1.0)   # TF-IDF cosine of profile and item
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(hybrid.score(q, items), unit(psi_u) @ unit(hybrid.psi).T / s.tfidf, rtol=1e-4, atol=1e-5)
    assert np.all(hybrid.dn.wmf.V[world["cold"]] == 0)   # cold items only get the offset from WMF


def test_tuning_maximises_cold_recall_without_giving_up_the_request_types_own_score(hybrid):
    hybrid.users, hybrid.favourites = Weights(), Weights()
    # own score: best at b = 2, and hurt by a cold offset beyond 1; cold score: grows with d and c
    def evaluate(model, kind, target):
        w = model.users if kind == "users" else model.favourites
        own = 1.0 - 0.1 * abs(w.b - 2.0) - 0.05 * max(0.0, w.d - 1.0)
        return own if target == "own" else w.d + 0.1 * w.c
    hybrid.tune(evaluate, tolerance=0.02)
    w = hybrid.users
    assert w.b == 2.0                      # stage 1 found the request type's optimum
    assert w.d == 1.0                      # the largest offset that keeps "own" within 2% (d=1.5 costs 2.5%)
    assert w.c == 2.0                      # then cold recall climbs along the free direction
    assert hybrid.tuning["users"]["own"] >= 0.98 * hybrid.tuning["users"]["own_stage1"]


def test_params_round_trip(hybrid):
    again = Hybrid.from_params(hybrid.dn, hybrid.params(), hybrid.train, tfidf=hybrid.psi)
    q = Queries.of_liked([[0, 4, 8]])
    np.testing.assert_allclose(again.score(q, np.arange(40)), hybrid.score(q, np.arange(40)), rtol=1e-6)


def test_the_tolerance_ladder_climbs_only_until_the_cold_target_is_met(hybrid):
    def evaluate(model, kind, target):
        w = model.users if kind == "users" else model.favourites
        own = 1.0 - 0.1 * abs(w.b - 2.0) - 0.05 * max(0.0, w.d - 1.0)
        return own if target == "own" else w.d + 0.1 * w.c
    # d=1 (+c=2) gives cold 1.2 at 2%; d=2 costs 5% of own, so reaching 2.2 needs the 5% rung
    hybrid.users, hybrid.favourites = Weights(), Weights()
    hybrid.tune(evaluate, tolerance=(0.02, 0.05, 0.10), cold_target={"users": 2.1, "favourites": 1.0})
    assert hybrid.tuning["users"]["tolerance"] == 0.05 and hybrid.users.d == 2.0
    assert [t["tolerance"] for t in hybrid.tuning["users"]["ladder"]] == [0.02, 0.05]
    assert hybrid.tuning["favourites"]["tolerance"] == 0.02 and hybrid.favourites.d == 1.0
    # an unreachable target keeps the last rung
    hybrid.users, hybrid.favourites = Weights(), Weights()
    hybrid.tune(evaluate, tolerance=(0.02, 0.05), cold_target={"users": 99.0, "favourites": 99.0})
    assert hybrid.tuning["users"]["tolerance"] == 0.05

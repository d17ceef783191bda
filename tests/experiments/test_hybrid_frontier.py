"""experiments/hybrid_frontier.py on the sample: the hybrid it refits scores as the selection says,
and raising the cold groups' offsets moves the whole-catalogue columns against each other (cold
anime only move up: warm recall can only fall, cold recall only rise, cold among cold not at all)."""

from __future__ import annotations

import numpy as np

from anime2vec.models.hybrid import ItemSide, Weights
from anime2vec.pipeline import SERVING_MODEL
from experiments.hybrid_frontier import SHIFTS, frontier, measure, refit
from tests.sample_bundles import fast_config


def test_the_frontier_trades_warm_against_cold_and_restores_the_weights(tmp_path):
    users = Weights(content=0.1, pop=[0.1, 0.2, 0.0, 0.0], offset={"warm": 0.0, "paired": -1.0, "text": -0.5})
    params = {
        "weights": {
            "users": users.as_dict(),
            "favourites": Weights().as_dict(),
            "text": Weights(cf=0.0, content=0.0, text=1.0).as_dict(),
        },
        "items": ItemSide().as_dict(),
        "cf": {"lambda": 300.0, "rank": 64},
        "content": {"lambda": 10.0, "mu": 10.0},
        "content_rank": 32,
    }
    hy, obj = refit({SERVING_MODEL: {"params": params}}, fast_config(tmp_path / "models", tmp_path / "cache"))
    assert hy.weights["users"].as_dict() == users.as_dict() and hy.cf is not None and hy.cf.lam == 300.0
    before = measure(hy, obj)
    rows = frontier(hy, obj)
    assert hy.weights["users"].as_dict() == users.as_dict()  # put back
    assert [r["shift"] for r in rows] == list(SHIFTS)
    at0 = next(r for r in rows if r["shift"] == 0.0)
    assert {k: at0[k] for k in before} == before
    warm, cold, new = (np.array([r[c] for r in rows]) for c in ("warm", "cold_whole", "new_whole"))
    assert np.all(np.diff(warm) <= 1e-12) and np.all(np.diff(cold) >= -1e-12) and np.all(np.diff(new) >= -1e-12)
    assert warm[0] > warm[-1] and cold[-1] > cold[0] and new[-1] > new[0]  # it does trade
    assert len({r["cold_test_items"] for r in rows}) == 1

"""The users collection (online-updated user vectors, one per model version) on both index
backends: what is written is read back after a reopen, per version, and never mixes with items."""

from __future__ import annotations

import numpy as np
import pytest

from anime2vec.index.base import ItemPoint, UserPoint
from tests.ranker.test_index import make_index  # noqa: F401  (fixture, found by name)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]
BIG_ID = 10**12 + 7  # user ids need not be small


def test_users_are_stored_per_version_and_survive_a_reopen(make_index):
    index = make_index(persistent=True)
    index.create_version("v1", 4, [ItemPoint(1, np.ones(4, np.float32), {"title": "a"})])
    assert index.get_users("v1", [BIG_ID]) == [] and index.count_users("v1") == 0
    payload = {
        "model_version": "v1",
        "listed": [1, 2],
        "confidences": [4.2, 0.0],
        "events": [["e1", 1, "rated", 9, None, 1.5]],
    }
    index.upsert_users(
        "v1",
        4,
        [
            UserPoint(BIG_ID, np.arange(4, dtype=np.float32), payload),
            UserPoint(5, np.ones(4, np.float32), {"model_version": "v1"}),
        ],
    )
    index.upsert_users("v1", 4, [UserPoint(5, np.full(4, 2.0, np.float32), {"model_version": "v1", "n": 2})])
    index.close()

    index = make_index(persistent=True)
    got = index.get_users("v1", [5, 404, BIG_ID])
    assert [u.user_id for u in got] == [5, BIG_ID]
    assert got[0].vector.tolist() == [2.0] * 4 and got[0].payload["n"] == 2
    assert got[1].vector.tolist() == [0.0, 1.0, 2.0, 3.0] and got[1].payload == {**payload, "user_id": BIG_ID}
    assert index.count_users("v1") == 2
    assert index.get_users("v2", [5]) == [] and index.count_users("v2") == 0  # another version: its own users
    assert index.versions() == ["v1"] and index.count("v1") == 1  # users are not items
    with pytest.raises(ValueError):
        index.upsert_users("v1", 5, [UserPoint(6, np.ones(5, np.float32), {})])  # the version's dim is fixed
    with pytest.raises(ValueError):
        index.upsert_users("v1", 4, [UserPoint(6, np.array([np.nan, 0, 0, 0], np.float32), {})])

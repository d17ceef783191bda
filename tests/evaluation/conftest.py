"""A hand-built Dataset small enough that every expected number in these tests is worked out by
hand in comments. Items 0-7 are train items, 8-9 val items, 10-11 test items; users 0-5 are train
users, 6-7 val users, 8-9 test users.

Training popularity (positives per item): item 0: 4, item 1: 3, items 2-6: 1, items 7-11: 0,
so popularity order is exactly the item index order.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.data.dataset import Dataset

N_USERS, N_ITEMS = 10, 12


def _m(entries: dict[int, dict[int, float]]) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    for u, row in entries.items():
        for i, c in row.items():
            rows.append(u), cols.append(i), vals.append(c)
    m = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    m.sort_indices()
    return m


def tiny_dataset() -> Dataset:
    return Dataset(
        item_ids=np.arange(100, 100 + N_ITEMS),
        user_ids=np.arange(1000, 1000 + N_USERS),
        train_items=np.arange(8),
        val_items=np.array([8, 9]),
        test_items=np.array([10, 11]),
        train_users=np.arange(6),
        val_users=np.array([6, 7]),
        test_users=np.array([8, 9]),
        train=_m(
            {0: {0: 5, 1: 3, 2: 1}, 1: {0: 2, 3: 1}, 2: {1: 1, 4: 2}, 3: {0: 1, 5: 1}, 4: {0: 1, 1: 1}, 5: {6: 1}}
        ),
        warm_val=_m({0: {3: 1}, 2: {0: 1}}),
        warm_test=_m({0: {4: 1}, 1: {1: 1}, 3: {2: 1}}),
        cold_val=_m({1: {8: 1}, 4: {9: 1}}),
        cold_test=_m({0: {10: 1, 11: 1}, 2: {10: 1, 11: 1}, 5: {11: 1}}),
        # user 6: a tie between items 1 and 2; user 7 and user 9 have too few for fav_ks=(1, 2)
        heldout=_m({6: {0: 5, 1: 2, 2: 2, 3: 1}, 7: {4: 1, 5: 1}, 8: {0: 1, 2: 3, 7: 2}, 9: {1: 1}}),
        seed=0,
    )


# user 0 trained on "Naruto" -> its test item "Naruto: Shippuuden" is same-franchise; user 5
# trained on "Kimi no Na wa." -> "Kimi no Na wa. Special" is same-franchise; "Kimi no Todoke"
# (user 0) is NOT the franchise of "Kimi no Na wa." (stopword "no" dropped from the key).
TITLES = np.array(
    [
        "Naruto",
        "Shingeki no Kyojin",
        "Kimi no Todoke",
        "Cowboy Bebop",
        "Toradora!",
        "Clannad",
        "Kimi no Na wa.",
        "Mushishi",
        "Shingeki no Kyojin Season 2",
        "Haikyuu!!",
        "Naruto: Shippuuden",
        "Kimi no Na wa. Special",
    ]
)

# 2-d content space for intra-list diversity; pairs used below:
# (0,1) same direction -> distance 0; (2,3) opposite -> 2; (5,6) 45 degrees -> 1 - 1/sqrt(2);
# (10,11) orthogonal -> 1
SPACE = np.array(
    [[1, 0], [2, 0], [0, 3], [0, -1], [1, 1], [1, 0], [1, 1], [0, 1], [1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32
)


@pytest.fixture
def tiny() -> Dataset:
    return tiny_dataset()


@pytest.fixture
def titles() -> np.ndarray:
    return TITLES.copy()


@pytest.fixture
def space() -> np.ndarray:
    return SPACE.copy()

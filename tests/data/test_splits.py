"""The evaluation splits: cold items never leak into training, users are disjoint, seeds fix everything."""

import numpy as np
import pytest

from anime2vec.data.dataset import build_dataset
from anime2vec.data.loader import load_mal


@pytest.fixture(scope="module")
def sample():
    return load_mal(sample=True)


@pytest.fixture(scope="module")
def ds(sample):
    return build_dataset(sample.catalog, sample.interactions, seed=0)


def test_no_validation_or_test_item_has_a_training_interaction(ds):
    assert ds.train[:, ds.val_items].nnz == 0
    assert ds.train[:, ds.test_items].nnz == 0
    for m in (ds.warm_val, ds.warm_test, ds.heldout):
        assert m[:, ds.val_items].nnz == 0 and m[:, ds.test_items].nnz == 0
    # and the cold matrices hold only their own items
    assert set(np.unique(ds.cold_val.indices)) <= set(ds.val_items)
    assert set(np.unique(ds.cold_test.indices)) <= set(ds.test_items)


def test_item_and_user_splits_are_disjoint_and_about_8_1_1(ds):
    items = [set(ds.train_items), set(ds.val_items), set(ds.test_items)]
    users = [set(ds.train_users), set(ds.val_users), set(ds.test_users)]
    for group in (items, users):
        assert not (group[0] & group[1]) and not (group[0] & group[2]) and not (group[1] & group[2])
    n = sum(map(len, items))
    assert abs(len(items[0]) / n - 0.8) < 0.01 and abs(len(items[2]) / n - 0.1) < 0.01


def test_held_out_users_are_absent_from_training(ds):
    held = np.concatenate([ds.val_users, ds.test_users])
    assert ds.train[held].nnz == 0 and ds.warm_test[held].nnz == 0 and ds.cold_test[held].nnz == 0
    assert ds.heldout[ds.train_users].nnz == 0 and ds.heldout.nnz > 0


def test_every_positive_lands_in_exactly_one_matrix(sample, ds):
    idx = ds.item_index()
    pos = sample.interactions[sample.interactions["positive"]]
    pos = pos[pos["anime_id"].isin(idx) & pos["user_id"].isin(set(ds.user_ids.tolist()))]
    # the one pair set aside by design: held-out users on cold items (neither cold-user nor cold-item data)
    held = set(ds.user_ids[np.concatenate([ds.val_users, ds.test_users])].tolist())
    cold = set(ds.item_ids[np.concatenate([ds.val_items, ds.test_items])].tolist())
    dropped = pos["user_id"].isin(held) & pos["anime_id"].isin(cold)
    mats = (ds.train, ds.warm_val, ds.warm_test, ds.cold_val, ds.cold_test, ds.heldout)
    assert sum(m.nnz for m in mats) == len(pos) - dropped.sum() and dropped.sum() > 0
    total = sum((m > 0).astype(int) for m in mats)
    assert total.max() == 1
    # warm holdout is ~10% / ~20% of train users' positives on train items
    warm_all = ds.train.nnz + ds.warm_val.nnz + ds.warm_test.nnz
    assert 0.15 < ds.warm_test.nnz / warm_all < 0.25


def test_splits_are_fixed_by_the_seed(sample, ds):
    again = build_dataset(sample.catalog, sample.interactions, seed=0)
    other = build_dataset(sample.catalog, sample.interactions, seed=1)
    assert np.array_equal(again.test_items, ds.test_items)
    assert (again.train != ds.train).nnz == 0
    assert not np.array_equal(other.test_items, ds.test_items)


def test_item_universe_is_the_catalogue_with_text(sample, ds):
    with_text = sample.catalog.index[sample.catalog["synopsis"].str.strip().str.len() > 0]
    assert set(ds.item_ids.tolist()) == set(with_text.tolist())

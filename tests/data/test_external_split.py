"""An externally supplied split (another protocol's train/val/test users and items) is used as given."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anime2vec.data.dataset import ExternalSplit, build_dataset
from anime2vec.data.loader import load_mal


@pytest.fixture(scope="module")
def data():
    return load_mal(None, sample=True)


def test_an_external_split_is_used_as_given(data, tmp_path):
    base = build_dataset(data.catalog, data.interactions, seed=3)
    rng = np.random.default_rng(0)
    items = rng.permutation(base.item_ids[np.concatenate([base.train_items, base.val_items, base.test_items])])
    users = rng.permutation(base.user_ids)
    n_i, n_u = len(items), len(users)
    spec = {
        "train_items": items[: n_i * 7 // 10],
        "val_items": items[n_i * 7 // 10 : n_i * 85 // 100],
        "test_items": items[n_i * 85 // 100 :],
        "train_users": users[: n_u * 7 // 10],
        "val_users": users[n_u * 7 // 10 : n_u * 85 // 100],
        "test_users": users[n_u * 85 // 100 :],
    }
    path = tmp_path / "split.json"
    path.write_text(json.dumps({k: [int(x) for x in v] for k, v in spec.items()}))
    ds = build_dataset(data.catalog, data.interactions, seed=3, split=ExternalSplit.from_json(path))
    for key in ("train_items", "val_items", "test_items"):
        assert set(ds.item_ids[getattr(ds, key)].tolist()) == set(spec[key].tolist())
    for key in ("train_users", "val_users", "test_users"):
        assert set(ds.user_ids[getattr(ds, key)].tolist()) == set(spec[key].tolist())
    # training interactions only of training users on training items; cold truth only on val/test items
    tr = ds.train.tocoo()
    assert set(np.unique(tr.row)) <= set(ds.train_users.tolist())
    assert set(np.unique(tr.col)) <= set(ds.train_items.tolist())
    assert set(np.unique(ds.cold_test.tocoo().col)) <= set(ds.test_items.tolist())
    assert ds.params["item_fractions"] == "external"


def test_an_overlapping_split_is_refused(data, tmp_path):
    path = tmp_path / "split.json"
    path.write_text(
        json.dumps(
            {
                "train_items": [1, 2],
                "val_items": [2],
                "test_items": [3],
                "train_users": [1],
                "val_users": [2],
                "test_users": [3],
            }
        )
    )
    with pytest.raises(ValueError, match="overlap"):
        build_dataset(data.catalog, data.interactions, split=ExternalSplit.from_json(path))
    path.write_text(json.dumps({"train_items": [1]}))
    with pytest.raises(ValueError, match="lacks"):
        ExternalSplit.from_json(path)

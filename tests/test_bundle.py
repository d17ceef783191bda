"""Bundles: a round trip keeps every array; a corrupt, incomplete or incompatible bundle is refused."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from anime2vec.bundle import BundleError, list_bundles, load_bundle, write_bundle


def _parts(n_users=5, n_items=7, f=3, d=4, t=2):
    rng = np.random.default_rng(0)
    arrays = {
        "item_ids": np.arange(100, 100 + n_items),
        "user_ids": np.arange(n_users),
        "wmf_U": rng.normal(size=(n_users, f)).astype(np.float32),
        "wmf_V": rng.normal(size=(n_items, f)).astype(np.float32),
        "content": rng.normal(size=(n_items, d)).astype(np.float32),
        "item_tower": rng.normal(size=(n_items, t)).astype(np.float32),
        "hybrid.q": rng.normal(size=(n_items, f)).astype(np.float32),
        "hybrid.C": rng.normal(size=(n_items, d + 1)).astype(np.float32),
        "hybrid.Wv": rng.normal(size=(d + 1, t)).astype(np.float32),
    }
    catalog = pd.DataFrame(
        {
            "anime_id": arrays["item_ids"],
            "title": [f"Show {i}" for i in range(n_items)],
            "genres": [["Action"]] * n_items,
        }
    )
    train = sp.random(n_users, n_items, density=0.4, random_state=0, format="csr", dtype=np.float32)
    manifest = {
        "dims": {
            "n_items": n_items,
            "n_users": n_users,
            "factors": f,
            "content_dim": d,
            "tower_dim": t,
            "hybrid_content_dim": d + 1,
        },
        "encoder": {"name": "test"},
    }
    return manifest, catalog, arrays, train


@pytest.fixture
def bundle_path(tmp_path):
    return write_bundle(tmp_path / "store", *_parts())


def test_round_trip_keeps_every_array_and_the_training_matrix(bundle_path):
    manifest, catalog, arrays, train = _parts()
    b = load_bundle(bundle_path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(b.arrays[k], v)
    assert (b.train != train).nnz == 0
    assert b.catalog["title"].tolist() == catalog["title"].tolist()
    assert b.prefixed("hybrid").keys() == {"q", "C", "Wv"}
    assert b.version == bundle_path.name and b.manifest["dims"]["n_items"] == 7


def _make_writable(path):
    for p in path.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o644)


def test_a_flipped_byte_is_refused_with_the_file_named(bundle_path):
    target = bundle_path / "arrays" / "wmf_V.npy"
    assert not os.access(target, os.W_OK) or os.geteuid() == 0  # written read-only
    _make_writable(bundle_path)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for arrays/wmf_V.npy"):
        load_bundle(bundle_path)


def test_a_missing_file_is_refused(bundle_path):
    _make_writable(bundle_path)
    (bundle_path / "arrays" / "item_tower.npy").unlink()
    with pytest.raises(BundleError, match="item_tower.npy listed in the manifest is missing"):
        load_bundle(bundle_path)


def test_incompatible_dimensions_are_refused(bundle_path):
    _make_writable(bundle_path)
    m = json.loads((bundle_path / "manifest.json").read_text())
    m["dims"]["tower_dim"] = 3
    (bundle_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="item_tower dim is 2, expected 3"):
        load_bundle(bundle_path)


def test_hybrid_arrays_of_another_catalogue_are_refused(tmp_path):
    """The served hybrid's per-anime arrays must have one row per anime (and the content width the
    manifest says): a ranker must never build item vectors from another catalogue's rows."""
    manifest, catalog, arrays, train = _parts()
    arrays["hybrid.q"] = arrays["hybrid.q"][:-1]
    with pytest.raises(BundleError, match="hybrid.q rows is 6, expected 7"):
        load_bundle(write_bundle(tmp_path / "a", manifest, catalog, arrays, train))
    manifest, catalog, arrays, train = _parts()
    manifest["dims"]["hybrid_content_dim"] = 9
    with pytest.raises(BundleError, match="hybrid.C dim is 5, expected 9"):
        load_bundle(write_bundle(tmp_path / "b", manifest, catalog, arrays, train))


def test_unknown_format_and_non_bundles_are_refused(bundle_path, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    _make_writable(bundle_path)
    m = json.loads((bundle_path / "manifest.json").read_text())
    m["format"] = 99
    (bundle_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(bundle_path)


def test_bundles_are_immutable_and_listed(tmp_path):
    store = tmp_path / "store"
    a = write_bundle(store, *_parts(), version="v1")
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(store, *_parts(), version="v1")
    assert list_bundles(store) == [a]
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp")]  # failed write left nothing


def test_inconsistent_arrays_are_never_written(tmp_path):
    manifest, catalog, arrays, train = _parts()
    del arrays["item_tower"]
    with pytest.raises(BundleError, match="missing arrays"):
        write_bundle(tmp_path, manifest, catalog, arrays, train)

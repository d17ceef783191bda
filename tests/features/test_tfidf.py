from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.features.tfidf import TfidfFeatures

HAND = ["pirate ship treasure", "pirate ship sea", "cooking bakery bread", "cooking bakery cake"]


def test_hand_computed_weights_and_top_terms():
    f = TfidfFeatures(min_df=1, max_df=1.0, svd_dim=2)
    x = f.fit_transform(HAND)
    # smooth idf = ln((1 + n) / (1 + df)) + 1 with n = 4; tf = 1 (sublinear: 1 + ln 1)
    idf_shared, idf_unique = math.log(5 / 3) + 1, math.log(5 / 2) + 1
    norm = math.sqrt(2 * idf_shared**2 + idf_unique**2)
    top = f.top_terms(x[0], k=2)
    assert [t for t, _ in top] == ["treasure", "pirate"]  # pirate/ship tie: alphabetical
    np.testing.assert_allclose([w for _, w in top], [idf_unique / norm, idf_shared / norm], rtol=1e-6)
    assert f.top_terms(x[0].toarray()[0], k=10) == f.top_terms(x[0], k=10)
    assert len(f.top_terms(x[0], k=10)) == 3


def test_max_df_drops_terms_most_documents_share():
    f = TfidfFeatures(min_df=1, max_df=0.5, svd_dim=2)
    f.fit_transform([t + " anime" for t in HAND])
    assert "anime" not in set(f.terms) and "pirate" in set(f.terms)


def test_shapes_and_norms_on_sample(sample_anime):
    texts = sample_anime["synopsis"].tolist()
    f = TfidfFeatures(svd_dim=50)
    x = f.fit_transform(texts)
    assert sp.issparse(x) and x.shape == (len(texts), len(f.terms)) and len(f.terms) <= 8000
    np.testing.assert_allclose(sp.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    d = f.dense(x)
    assert d.shape == (len(texts), 50) and d.dtype == np.float32
    assert "rewrite" not in set(f.terms)  # "[Written by MAL Rewrite]" boilerplate
    unseen = f.transform(["zzzqqq xxyyzz"])
    assert unseen.nnz == 0 and np.all(f.dense(unseen) == 0)


def test_persistence_round_trip_is_identical(sample_anime, tmp_path):
    texts = sample_anime["synopsis"].tolist()
    f = TfidfFeatures(svd_dim=20, max_features=3000, seed=7)
    f.fit_transform(texts[:600])
    f.save(tmp_path / "tfidf.npz")
    g = TfidfFeatures.load(tmp_path / "tfidf.npz")
    held_out = texts[600:]
    a, b = f.transform(held_out), g.transform(held_out)
    assert (a != b).nnz == 0
    np.testing.assert_array_equal(f.dense(a), g.dense(b))
    assert g.params == f.params and list(g.terms) == list(f.terms)
    assert g.top_terms(b[0], 5) == f.top_terms(a[0], 5)


def test_errors():
    f = TfidfFeatures(min_df=1, svd_dim=10)
    with pytest.raises(RuntimeError, match="not fitted"):
        f.transform(HAND)
    with pytest.raises(ValueError, match="svd_dim=10 needs more than 10 terms"):
        f.fit_transform(HAND)
    f = TfidfFeatures(min_df=1, max_df=1.0, svd_dim=2)
    x = f.fit_transform(HAND)
    with pytest.raises(ValueError, match="one row"):
        f.top_terms(x, 3)


def test_load_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an anime2vec.tfidf/1 file"):
        TfidfFeatures.load(tmp_path / "x.npz")

"""WMF's one-history fold-in (the serving path) solves the same equations as implicit's."""

import numpy as np
import scipy.sparse as sp

from anime2vec.models.wmf import WMF

from .synthetic import two_cluster_world


def test_fold_in_one_equals_implicits_recalculate_user_including_repeated_items():
    world = two_cluster_world()
    wmf = WMF(factors=8, regularization=0.1, alpha=5.0, iterations=10, seed=0).fit(world["train"])
    n_items = world["train"].shape[1]
    rng = np.random.default_rng(1)
    for size in (1, 3, 12):
        items = rng.choice(np.flatnonzero(np.any(wmf.V != 0, axis=1)), size, replace=False)
        items = np.concatenate([items, items[:1]])  # the first item twice: a CSR sums them
        conf = rng.uniform(0.5, 5.0, len(items)).astype(np.float32)
        h = sp.csr_matrix((conf, (np.zeros(len(items), int), items)), shape=(1, n_items))
        want = wmf.fold_in(h)[0]
        got = wmf.fold_in_one(items, conf)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.abs(want).max() > 1e-2  # a real solve, not two zero vectors
    np.testing.assert_array_equal(
        wmf.fold_in_one(np.array([], np.int64), np.array([], np.float32)), np.zeros(8, np.float32)
    )

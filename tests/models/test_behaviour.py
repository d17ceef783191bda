"""One behavioural suite every recommender must pass, on a tiny two-cluster dataset.

Register a model by adding a factory to MODEL_FACTORIES: it takes (dataset, content) and returns an
UNFITTED model whose randomness is fixed by its own seed. Models with `learns_preferences = True`
must also beat popularity at recommending in-cluster items. The served model itself (a real bundle
loaded into the ranker's ServingModel, through `ServedRecommender`, the adapter every offline
evaluation of a bundle uses) passes the same contract on the sample data it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.bundle import load_bundle
from anime2vec.data.dataset import Dataset
from anime2vec.models.base import Queries, Recommender
from anime2vec.models.bilinear import ContentBilinear
from anime2vec.models.content_knn import ContentKNN
from anime2vec.models.dropoutnet import DropoutNet, DropoutNetConfig
from anime2vec.models.ease import EASE
from anime2vec.models.hybrid import Hybrid
from anime2vec.models.itemknn import ItemKNN
from anime2vec.models.popularity import Popularity
from anime2vec.models.rp3beta import RP3beta
from anime2vec.models.wmf import WMF
from anime2vec.retrain import base_dataset
from anime2vec.serving_model.model import ServingModel
from anime2vec.serving_model.recommender import ServedRecommender
from tests.sample_bundles import fast_config, train_fast_bundle

Factory = Callable[[Dataset, np.ndarray], Recommender]
MODEL_FACTORIES: list[tuple[str, Factory]] = [
    ("popularity", lambda ds, content: Popularity()),
    ("item-knn", lambda ds, content: ItemKNN(K=20)),
    ("wmf", lambda ds, content: WMF(factors=8, regularization=0.1, alpha=5.0, iterations=10, seed=0, threads=1)),
    ("content-knn", lambda ds, content: ContentKNN(content, name="content-knn")),
    (
        "dropoutnet",
        lambda ds, content: DropoutNet(
            content,
            WMF(factors=8, regularization=0.1, alpha=5.0, iterations=10, seed=0, threads=1),
            DropoutNetConfig(
                hidden=(32,), out_dim=16, epochs=30, batch_users=16, top_pool=10, n_top=8, n_rand=8, lr=3e-3, seed=0
            ),
            device="cpu",
        ),
    ),
    # λ on the scale of this tiny matrix (items have ~15 positives; the default 500 is for MAL)
    ("ease", lambda ds, content: EASE(lam=10.0)),
    ("ease-factored", lambda ds, content: EASE(lam=10.0, rank=12, seed=0)),
    ("rp3beta", lambda ds, content: RP3beta(alpha=1.0, beta=0.5, K=20)),
    ("content-bilinear", lambda ds, content: ContentBilinear(content, lam=1.0, mu=1.0, seed=0)),
    (
        "anime2vec-hybrid",
        lambda ds, content: Hybrid(
            EASE(lam=10.0, rank=12, seed=0),
            ContentBilinear(content, lam=1.0, mu=1.0, seed=0),
            graph=None,
            content_rank=None,
        ),
    ),
]

# Two clusters of items (A: 0-19, B: 20-39) and users (A: 24, B: 36). Users like items of their
# own cluster and, now and then, one of the other. B has more users, so B items are the popular
# ones and popularity recommends B items to everybody: a preference learner must do better on A.
N_ITEMS, N_A_ITEMS, N_A_USERS, N_USERS, DIM = 40, 20, 24, 60, 8
VAL_ITEMS, TEST_ITEMS = np.array([18, 19, 38, 39]), np.array([16, 17, 36, 37])
VAL_USERS, TEST_USERS = np.array([0, 1, 2, 24, 25, 26]), np.array([3, 4, 5, 27, 28, 29])


def _split(ds_rng: np.random.Generator, likes: sp.coo_matrix) -> Dataset:
    """Cut the splits the way anime2vec.data.dataset documents them."""
    u, i, c = likes.row, likes.col, likes.data
    cold = np.isin(i, np.r_[VAL_ITEMS, TEST_ITEMS])
    held_user = np.isin(u, np.r_[VAL_USERS, TEST_USERS])
    draw = ds_rng.random(len(u))
    warm = ~cold & ~held_user
    to_val, to_test = warm & (draw < 0.1), warm & (draw >= 0.1) & (draw < 0.3)

    def m(mask):
        out = sp.csr_matrix((c[mask], (u[mask], i[mask])), shape=(N_USERS, N_ITEMS), dtype=np.float32)
        out.sort_indices()
        return out

    train_users = np.setdiff1d(np.arange(N_USERS), np.r_[VAL_USERS, TEST_USERS])
    return Dataset(
        item_ids=np.arange(1, N_ITEMS + 1),
        user_ids=np.arange(1, N_USERS + 1),
        train_items=np.setdiff1d(np.arange(N_ITEMS), np.r_[VAL_ITEMS, TEST_ITEMS]),
        val_items=VAL_ITEMS,
        test_items=TEST_ITEMS,
        train_users=train_users,
        val_users=VAL_USERS,
        test_users=TEST_USERS,
        train=m(warm & ~to_val & ~to_test),
        warm_val=m(to_val),
        warm_test=m(to_test),
        cold_val=m(~held_user & np.isin(i, VAL_ITEMS)),
        cold_test=m(~held_user & np.isin(i, TEST_ITEMS)),
        heldout=m(held_user & ~cold),
        seed=0,
    )


def block_dataset(seed: int = 0) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """(dataset, content (N_ITEMS, DIM) float32, item cluster (N_ITEMS,) 0/1)."""
    rng = np.random.default_rng(seed)
    item_cluster = (np.arange(N_ITEMS) >= N_A_ITEMS).astype(int)
    rows, cols = [], []
    for user in range(N_USERS):
        own = np.flatnonzero(item_cluster == int(user >= N_A_USERS))
        liked = list(rng.choice(own, size=10, replace=False))
        if rng.random() < 0.3:
            liked.append(rng.choice(np.flatnonzero(item_cluster != int(user >= N_A_USERS))))
        rows += [user] * len(liked)
        cols += liked
    conf = rng.integers(1, 6, size=len(rows)).astype(np.float32)
    likes = sp.coo_matrix((conf, (rows, cols)), shape=(N_USERS, N_ITEMS))
    centre = np.where(item_cluster[:, None] == 0, 1.0, -1.0) * np.eye(DIM)[0]
    content = (centre + 0.3 * rng.normal(size=(N_ITEMS, DIM))).astype(np.float32)
    return _split(rng, likes), content, item_cluster


@pytest.fixture(scope="module")
def world():
    return block_dataset()


@dataclass
class Case:
    """A fitted model with the data it answers on: queries of each kind and a candidate set that
    mixes warm and cold items."""

    model: Recommender
    ds: Dataset
    queries: dict[str, Queries]
    mixed_items: np.ndarray

    @property
    def n_items(self) -> int:
        return self.ds.n_items


def _query_kinds(ds: Dataset) -> dict[str, Queries]:
    return {
        "users": Queries.of_users(ds.train_users[::4]),
        # favourites, one of them a cold (val) item: a user may like an anime nobody rated yet
        "liked": Queries.of_liked(
            [[0, 1, 2], [25], [3, 18], [20, 21, 22, 23, 30]], weights=[[5, 1, 1], [2], [1, 3], [1, 1, 1, 1, 1]]
        ),
    }


@pytest.fixture(scope="module")
def served_bundle(tmp_path_factory):
    """(bundle path, its dataset): a real bundle of the sample data (tiny-random encoder)."""
    root = tmp_path_factory.mktemp("served")
    cfg = fast_config(root / "models", root / "cache")
    path = train_fast_bundle(cfg)
    return path, base_dataset(cfg)[1]


def served_case(path, ds: Dataset) -> Case:
    model = ServedRecommender(ServingModel(load_bundle(path)), ds.item_ids, ds.user_ids, ds.train, name="served")
    tr = ds.train_items
    liked = [tr[:3], tr[10:11], [tr[20], ds.val_items[0]], tr[30:35]]
    queries = {
        "users": Queries.of_users(ds.train_users[::97]),
        "liked": Queries.of_liked(liked, weights=[[5, 1, 1], [2], [1, 3], [1, 1, 1, 1, 1]]),
    }
    return Case(model, ds, queries, np.r_[tr[::7], ds.test_items[::3]])


@pytest.fixture(
    scope="module",
    params=[*MODEL_FACTORIES, ("served-bundle", None)],
    ids=[*(name for name, _ in MODEL_FACTORIES), "served-bundle"],
)
def case(request, world) -> Case:
    if request.param[1] is None:
        return served_case(*request.getfixturevalue("served_bundle"))
    ds, content, _ = world
    model = request.param[1](ds, content).fit(ds.train)
    return Case(model, ds, _query_kinds(ds), np.r_[np.arange(N_ITEMS)[::3], TEST_ITEMS])


KINDS = ("users", "liked")


@pytest.mark.parametrize("kind", KINDS)
def test_score_shape_dtype_and_finite(case, kind):
    fitted, q, items = case.model, case.queries[kind], case.mixed_items  # warm and cold items together
    s = fitted.score(q, items)
    assert isinstance(s, np.ndarray) and s.shape == (len(q), len(items)) and s.dtype == np.float32
    assert np.isfinite(s).all()


@pytest.mark.parametrize("kind", KINDS)
def test_scores_follow_the_item_order(case, kind):
    fitted, q = case.model, case.queries[kind]
    items = np.arange(case.n_items)
    perm = np.random.default_rng(1).permutation(case.n_items)
    np.testing.assert_allclose(fitted.score(q, items[perm]), fitted.score(q, items)[:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_invariance(case, kind):
    fitted, q = case.model, case.queries[kind]
    items = np.arange(case.n_items)
    together = fitted.score(q, items)
    one_by_one = np.vstack([fitted.score(q.slice(i, i + 1), items) for i in range(len(q))])
    np.testing.assert_allclose(one_by_one, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_recommend_respects_candidates_and_exclusions(case, kind):
    fitted, q = case.model, case.queries[kind]
    rng = np.random.default_rng(2)
    items = np.sort(rng.choice(case.n_items, size=25, replace=False))
    exclude = sp.csr_matrix((rng.random((len(q), case.n_items)) < 0.3).astype(np.float32))
    idx, scores = fitted.recommend(q, k=10, items=items, exclude=exclude, batch_size=3)
    assert idx.shape == scores.shape == (len(q), 10)
    full = fitted.score(q, items)
    known = np.asarray(fitted.scorable(items), bool)
    for r in range(len(q)):
        got = idx[r][idx[r] >= 0]
        assert set(got) <= set(items[known].tolist())  # never an item the model cannot score
        assert not set(got) & set(exclude[r].indices.tolist())
        assert len(set(got)) == len(got)
        assert np.all(np.diff(scores[r][idx[r] >= 0]) <= 0)  # best first
        # the returned scores are the model's scores for those items
        np.testing.assert_allclose(scores[r][idx[r] >= 0], full[r, np.searchsorted(items, got)], rtol=1e-5, atol=1e-6)
        # nothing admissible (scorable, not excluded) scores above the last returned item
        admissible = np.setdiff1d(items[known], exclude[r].indices)
        if len(got) == 10:
            rest = np.setdiff1d(admissible, got)
            assert full[r, np.searchsorted(items, rest)].max(initial=-np.inf) <= scores[r][-1] + 1e-6


def test_recommend_pads_when_too_few_candidates_remain(case):
    fitted, q = case.model, case.queries["liked"]
    items = np.arange(6)
    exclude = sp.csr_matrix(
        (np.ones(len(q) * 3, np.float32), (np.repeat(np.arange(len(q)), 3), np.tile([0, 2, 4], len(q)))),
        shape=(len(q), case.n_items),
    )
    idx, scores = fitted.recommend(q, k=6, items=items, exclude=exclude)
    assert (np.sort(idx[:, :3], axis=1) == [1, 3, 5]).all()
    assert (idx[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_determinism(world):
    ds, content, _ = world
    for name, factory in MODEL_FACTORIES:
        for kind, q in _query_kinds(ds).items():
            a = factory(ds, content).fit(ds.train).score(q, np.arange(N_ITEMS))
            b = factory(ds, content).fit(ds.train).score(q, np.arange(N_ITEMS))
            np.testing.assert_array_equal(a, b, err_msg=f"{name} / {kind}")


def test_the_served_model_is_deterministic_and_scores_as_the_ranker_does(served_bundle):
    """Two loads of one bundle score alike; and the adapter's scores are the ranker's ServingModel
    arithmetic (query vector · served item vectors) for a known user and for favourites."""
    path, ds = served_bundle
    a, b = served_case(path, ds), served_case(path, ds)
    for q in a.queries.values():
        np.testing.assert_array_equal(a.model.score(q, np.arange(ds.n_items)), b.model.score(q, np.arange(ds.n_items)))
    m = a.model.model
    assert m.has_vectors and np.array_equal(m.item_ids, ds.item_ids)
    u = int(ds.train_users[0])
    want = m.item_tower @ m.user_vector(int(ds.user_ids[u]))
    np.testing.assert_allclose(a.model.score(Queries.of_users([u]), np.arange(ds.n_items))[0], want, rtol=1e-6)
    liked = a.queries["liked"]
    want = m.item_tower @ m.favourites_vector([int(x) for x in ds.item_ids[liked.liked[0]]], [5.0, 1.0, 1.0])
    np.testing.assert_allclose(a.model.score(liked.slice(0, 1), np.arange(ds.n_items))[0], want, rtol=1e-6)


def test_the_served_model_answers_not_found_with_nothing(served_bundle):
    """A user the bundle never saw and favourites it knows none of: the ranker answers NOT_FOUND,
    so the adapter ranks nothing for them (recall 0), and counts it."""
    path, ds = served_bundle
    users = np.r_[ds.user_ids, [987_654_321]]
    model = ServedRecommender(ServingModel(load_bundle(path)), ds.item_ids, users, ds.train)
    idx, scores = model.recommend(Queries.of_users([len(users) - 1, 0]), k=5)
    assert (idx[0] == -1).all() and np.isneginf(scores[0]).all()
    assert (idx[1] >= 0).all()
    assert model.served_by == {"not_found": 1, "dropoutnet": 1}


def in_cluster_precision(model: Recommender, ds: Dataset, item_cluster: np.ndarray, kind: str, k: int = 5) -> float:
    """Mean share of cluster-A items in the top-k train-item recommendations for cluster-A
    queries: favourites (each A held-out user's three highest-confidence items) or A train users."""
    if kind == "liked":
        users = [u for u in np.r_[VAL_USERS, TEST_USERS] if u < N_A_USERS]
        liked = []
        for u in users:
            row = ds.heldout[u]
            liked.append(row.indices[np.argsort(-row.data, kind="stable")[:3]])
        q = Queries.of_liked(liked)
    else:
        q = Queries.of_users([u for u in ds.train_users if u < N_A_USERS])
    exclude = q.history_matrix(ds.train)
    idx, _ = model.recommend(q, k=k, items=ds.train_items, exclude=exclude)
    return float((item_cluster[idx] == 0).mean())


def test_the_fixture_defeats_popularity(world):
    """The quality bar means something: popularity puts almost no cluster-A item in front of
    cluster-A queries, because cluster B is more popular."""
    ds, _, item_cluster = world
    pop = Popularity().fit(ds.train)
    for kind in KINDS:
        assert in_cluster_precision(pop, ds, item_cluster, kind) <= 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_quality_beats_popularity(case, world, kind):
    fitted = case.model
    if case.ds is not world[0]:
        pytest.skip("the two-cluster world only (the served bundle's quality: tests/e2e, the retrain gate)")
    if not getattr(fitted, "learns_preferences", False):
        pytest.skip(f"{fitted.name} does not learn preferences")
    ds, _, item_cluster = world
    baseline = in_cluster_precision(Popularity().fit(ds.train), ds, item_cluster, kind)
    got = in_cluster_precision(fitted, ds, item_cluster, kind)
    assert got > baseline + 0.3, f"{fitted.name}: in-cluster precision {got:.2f} vs popularity {baseline:.2f}"


# ---- collaborative models and items nobody interacted with -------------------------------------
@pytest.mark.parametrize(
    "factory",
    [lambda: EASE(lam=10.0), lambda: EASE(lam=10.0, rank=12, seed=0), lambda: RP3beta(alpha=1.0, beta=0.5, K=20)],
    ids=["ease", "ease-factored", "rp3beta"],
)
def test_items_without_training_interactions_are_unscorable_and_never_recommended(world, factory):
    ds = world[0]
    model = factory().fit(ds.train)
    has_positives = np.asarray(ds.train.getnnz(axis=0)).ravel() > 0
    cold = np.r_[VAL_ITEMS, TEST_ITEMS]
    assert not has_positives[cold].any() and has_positives.sum() == N_ITEMS - len(cold)
    np.testing.assert_array_equal(model.scorable(np.arange(N_ITEMS)), has_positives)
    np.testing.assert_array_equal(model.scorable(cold[::-1]), np.zeros(len(cold), bool))
    for kind, q in _query_kinds(ds).items():
        # asked for the whole catalogue: every warm item, then padding, never a cold one
        idx, scores = model.recommend(q, k=N_ITEMS)
        assert not np.isin(idx, cold).any(), kind
        assert ((idx >= 0).sum(axis=1) == N_ITEMS - len(cold)).all(), kind
        assert (idx[:, N_ITEMS - len(cold) :] == -1).all() and np.isneginf(scores[:, N_ITEMS - len(cold) :]).all()
        # only cold candidates left: nothing to recommend
        idx, _ = model.recommend(q, k=4, items=cold)
        assert (idx == -1).all(), kind


def _clustered_matrix(n_users=200, n_items=90, n_clusters=4, n_cold=6, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    uc, ic = rng.integers(0, n_clusters, n_users), np.arange(n_items) % n_clusters
    p = np.where(uc[:, None] == ic[None, :], 0.3, 0.03) * rng.uniform(0.5, 1.5, n_items)[None, :]
    x = (rng.random((n_users, n_items)) < p).astype(np.float32)
    x[:, -n_cold:] = 0.0
    return sp.csr_matrix(x)


def test_factored_ease_at_full_rank_ranks_like_full_ease():
    train = _clustered_matrix()
    warm = np.flatnonzero(train.getnnz(axis=0))
    full = EASE(lam=20.0).fit(train)
    rng = np.random.default_rng(1)
    queries = {
        "users": Queries.of_users(np.arange(0, train.shape[0], 3)),
        "liked": Queries.of_liked([rng.choice(warm, 5, replace=False) for _ in range(40)]),
    }

    def overlap(model, q, k=20):
        ex = q.history_matrix(train)
        a, _ = full.recommend(q, k, items=warm, exclude=ex)
        b, _ = model.recommend(q, k, items=warm, exclude=ex)
        return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))

    at_full = full.factored(train.shape[1])
    assert at_full.B is full.B and at_full.P.shape[1] == len(warm) - 1  # no second solve; rank capped
    assert full.P is None  # the full model stays full
    np.testing.assert_array_equal(at_full.Q[~np.isin(np.arange(train.shape[1]), warm)], 0.0)
    coarse = full.factored(2)
    for kind, q in queries.items():
        assert overlap(at_full, q) >= 0.95, kind
        assert overlap(coarse, q) < 0.8, kind  # the comparison can tell ranks apart
    # fitting with `rank` is the same model as factoring a fitted one
    direct = EASE(lam=20.0, rank=40, seed=0).fit(train)
    np.testing.assert_allclose(direct.P, full.factored(40).P, rtol=1e-4, atol=1e-5)

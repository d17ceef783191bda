"""The served hybrid (models/hybrid.py) on the sample data: one dot product that ranks exactly like
its score, a state that serves without refitting, brand-new anime on day one, and the tuning."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest

from anime2vec.data.dataset import build_dataset
from anime2vec.data.loader import load_mal
from anime2vec.data.text import RECIPES, build_texts
from anime2vec.features.graph import rec_graph
from anime2vec.features.metadata import ItemMetadata, content_block
from anime2vec.features.tfidf import TfidfFeatures
from anime2vec.models.base import Queries
from anime2vec.models.bilinear import ContentBilinear
from anime2vec.models.ease import EASE
from anime2vec.models.hybrid import GRIDS, GROUPS, OUT, PAIRED, TEXT, WARM, Hybrid, Weights
from anime2vec.paths import default_data_dir

SAMPLE = default_data_dir() / "sample"


@pytest.fixture(scope="module")
def sample():
    """The sample dataset, a content matrix built the way the pipeline builds it (TF-IDF SVD, a
    seeded random block standing in for MiniLM, day-one metadata) and the recommendation graph."""
    if not (SAMPLE / "anime_sample.csv").is_file():
        pytest.skip(f"{SAMPLE} not found (set A2V_DATA_DIR)")
    data = load_mal(sample=True)
    ds = build_dataset(data.catalog, data.interactions, seed=0)
    catalog = data.catalog.loc[ds.item_ids]
    tfidf = TfidfFeatures(svd_dim=48, seed=0)
    tf_dense = tfidf.dense(tfidf.fit_transform(build_texts(catalog, RECIPES["default"]).tolist()))
    minilm = np.random.default_rng(0).normal(size=(ds.n_items, 16)).astype(np.float32)
    content = content_block([tf_dense, minilm, ItemMetadata.fit(catalog).transform(catalog)])
    return {"ds": ds, "content": content, "graph": rec_graph(data.recs, ds.item_ids)}


def build(sample) -> Hybrid:
    return Hybrid(
        EASE(lam=300.0, rank=64, seed=0),
        ContentBilinear(sample["content"], lam=10.0, mu=10.0, seed=0),
        graph=sample["graph"],
        content_rank=32,
    ).fit(sample["ds"].train)


@pytest.fixture(scope="module")
def fitted(sample) -> Hybrid:
    return build(sample)


# weights far from the defaults: every term and every group matters
PARAMS = {
    "weights": {
        "users": {
            "cf": 1.0,
            "content": 0.5,
            "text": 0.0,
            "pop": [0.2, 0.5, 1.0, 0.35],
            "offset": {"warm": 0.0, "paired": -0.5, "text": -1.25},
        },
        "favourites": {
            "cf": 0.75,
            "content": 1.5,
            "text": 0.0,
            "pop": [1.0, 0.5, 0.2, 0.1],
            "offset": {"warm": 0.25, "paired": 0.5, "text": -0.75},
        },
        "text": {
            "cf": 0.0,
            "content": 0.0,
            "text": 1.0,
            "pop": [0.0, 0.0, 0.0, 0.0],
            "offset": {"warm": 0.0, "paired": 0.0, "text": 0.0},
        },
    },
    "items": {
        "beta_cf": {"warm": 1.0, "paired": 0.75, "text": 0.0},
        "beta_content": {"warm": 1.0, "paired": 2.0, "text": 3.0},
    },
}


@pytest.fixture
def hybrid(fitted) -> Hybrid:
    """A copy with PARAMS set (tests may change it)."""
    return copy.deepcopy(fitted).set_params(copy.deepcopy(PARAMS))


def by_group(hy: Hybrid) -> dict[int, np.ndarray]:
    return {g: np.flatnonzero(hy.group == g) for g in (WARM, PAIRED, TEXT)}


def queries(hy: Hybrid, ds) -> dict[str, Queries]:
    """Known users with short and long histories (2 anime to many: three prior buckets) and
    favourites lists of 1 to 8 anime from every group, with confidences."""
    counts = np.asarray(ds.train.getnnz(axis=1))
    users = np.flatnonzero(counts)
    picked = np.unique(np.r_[users[np.argsort(counts[users], kind="stable")[:6]], users[::17]])
    g = by_group(hy)
    liked = [
        [g[WARM][0]],
        [g[PAIRED][0]],
        [g[TEXT][0]],
        [g[WARM][3], g[WARM][50]],
        [g[WARM][5], g[PAIRED][2], g[TEXT][1]],
        list(g[WARM][10:15]),
        [*g[WARM][20:25], *g[PAIRED][5:8]],
    ]
    weights = [np.linspace(1.0, 3.0, len(x)) for x in liked]
    return {"users": Queries.of_users(picked), "favourites": Queries.of_liked(liked, weights)}


def served_scores(hy: Hybrid, q: Queries, items=None) -> np.ndarray:
    h = q.history_matrix(hy.train)
    request = "users" if q.users is not None else "favourites"
    vectors = hy.serving_query_vectors(*hy.query_parts(h), request, h.getnnz(axis=1))
    return vectors @ hy.serving_item_vectors(np.arange(hy.train.shape[1]) if items is None else items).T


# ---- the groups --------------------------------------------------------------------------------
def test_every_anime_is_in_the_group_its_data_allows(fitted, sample):
    ds, graph = sample["ds"], sample["graph"]
    has_positives = np.asarray(ds.train.getnnz(axis=0)).ravel() > 0
    np.testing.assert_array_equal(fitted.group == WARM, has_positives)
    to_warm = np.asarray((graph @ has_positives.astype(np.float32))).ravel() > 0
    np.testing.assert_array_equal(fitted.group == PAIRED, ~has_positives & to_warm)
    g = by_group(fitted)
    assert all(len(g[x]) >= 5 for x in g)  # the sample has anime of every group
    # a paired anime borrows its warm neighbours' audience, a text-only one has none
    assert np.all(np.linalg.norm(fitted.q[g[PAIRED]], axis=1) > 0)
    np.testing.assert_array_equal(fitted.q[g[TEXT]], 0.0)
    np.testing.assert_array_equal(fitted.pop[~has_positives], 0.0)


def test_group_means_are_taken_out_per_query(fitted, sample):
    """Each component is 'how far above the average anime of its group', for every query."""
    for q in queries(fitted, sample["ds"]).values():
        for g, items in by_group(fitted).items():
            parts = fitted.component_scores(q, items)
            for name in ("cf", "content"):
                np.testing.assert_allclose(parts[name].mean(axis=1), 0.0, atol=1e-4, err_msg=f"{name}/{GROUPS[g]}")


# ---- one dot product ---------------------------------------------------------------------------
@pytest.mark.parametrize("request_type", ["users", "favourites"])
def test_serving_vectors_rank_exactly_like_the_score(hybrid, sample, request_type):
    q = queries(hybrid, sample["ds"])[request_type]
    items = np.arange(sample["ds"].n_items)
    expected = hybrid.score(q, items)
    assert np.ptp(expected) > 1.0  # not a flat (stub) score
    assert np.abs(served_scores(hybrid, q) - expected).max() < 1e-4
    # also for a subset in another order (the vector of an item does not depend on the others)
    some = np.random.default_rng(0).permutation(items)[:100]
    assert np.abs(served_scores(hybrid, q, some) - hybrid.score(q, some)).max() < 1e-4
    assert np.abs(hybrid.query_vectors(q) @ hybrid.serving_item_vectors(items).T - expected).max() < 1e-4


@pytest.mark.parametrize("request_type", ["users", "favourites"])
def test_a_listed_history_gives_the_csr_rows_query_parts_bit_for_bit(hybrid, sample, request_type):
    """The served path (`query_parts_listed`: the row's catalogue rows and confidences, no matrix)
    computes what the CSR product computes, to the last bit: short and long histories, every
    group, with content rows of anime outside the catalogue added."""
    h = queries(hybrid, sample["ds"])[request_type].history_matrix(hybrid.train)
    assert h.shape[0] >= 7 and h.getnnz(axis=1).max() >= (20 if request_type == "users" else 5)  # short and long
    extra = np.random.default_rng(1).normal(size=(1, hybrid.C.shape[1])).astype(np.float32)
    for i in range(h.shape[0]):
        row = h[i]
        for added in (None, extra):
            want = hybrid.query_parts(row, added)
            got = hybrid.query_parts_listed(row.indices, row.data, added)
            for w, g in zip(want, got):
                assert g.dtype == np.float32 and g.shape == w.shape
                np.testing.assert_array_equal(g, w)
    empty = hybrid.query_parts_listed(np.zeros(0, np.int64), np.zeros(0, np.float32))  # nothing in the catalogue
    for w, g in zip(hybrid.query_parts(h[:1] * 0), empty):
        np.testing.assert_array_equal(g, w)


def test_offsets_and_item_weights_act_on_their_group_only(hybrid, sample):
    q = queries(hybrid, sample["ds"])["favourites"]
    items = np.arange(sample["ds"].n_items)
    before = hybrid.score(q, items)
    hybrid.weights["favourites"].offset["text"] += 2.0
    after = hybrid.score(q, items)
    text = hybrid.group == TEXT
    np.testing.assert_allclose(after[:, text], before[:, text] + 2.0, atol=1e-5)
    np.testing.assert_array_equal(after[:, ~text], before[:, ~text])
    hybrid.items.beta_content["paired"] *= 2
    again = hybrid.score(q, items)
    paired = hybrid.group == PAIRED
    np.testing.assert_array_equal(again[:, ~paired], after[:, ~paired])
    assert not np.allclose(again[:, paired], after[:, paired])
    assert np.abs(served_scores(hybrid, q) - again).max() < 1e-4  # still one dot product


def test_a_request_type_uses_its_own_weights(hybrid, sample):
    ds = sample["ds"]
    user = queries(hybrid, ds)["users"].slice(0, 1)
    row = ds.train[user.users[0]]
    as_list = Queries.of_liked([row.indices], [row.data])  # the same history, asked as favourites
    items = np.arange(ds.n_items)
    assert not np.allclose(hybrid.score(user, items), hybrid.score(as_list, items))
    hybrid.weights["favourites"] = Weights.from_dict(hybrid.weights["users"].as_dict())
    np.testing.assert_allclose(hybrid.score(user, items), hybrid.score(as_list, items), rtol=1e-5, atol=1e-5)


# ---- state and parameters ----------------------------------------------------------------------
def test_from_state_serves_identically_without_the_fitted_parts(hybrid, sample):
    buf = io.BytesIO()  # through .npz and JSON, as a bundle stores them
    np.savez(buf, **hybrid.state())
    buf.seek(0)
    state = dict(np.load(buf))
    assert set(state) == set(Hybrid.STATE)
    params = json.loads(json.dumps(hybrid.params()))
    again = Hybrid.from_state(state, params, sample["ds"].train)
    assert again.cf is None and again.content is None  # no EASE or bilinear model needed
    items = np.arange(sample["ds"].n_items)
    for kind, q in queries(hybrid, sample["ds"]).items():
        np.testing.assert_allclose(again.score(q, items), hybrid.score(q, items), rtol=1e-6, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(served_scores(again, q), served_scores(hybrid, q), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(again.serving_item_vectors(items), hybrid.serving_item_vectors(items))
    moved = by_group(hybrid)[PAIRED][:5]
    np.testing.assert_array_equal(
        again.day_one(moved).serving_item_vectors(moved), hybrid.day_one(moved).serving_item_vectors(moved)
    )


def test_set_params_round_trips(fitted, hybrid, sample):
    params = hybrid.params()
    assert params["weights"] == PARAMS["weights"] and params["items"] == PARAMS["items"]
    assert params["cf"]["rank"] == 64 and params["graph"] is True and params["content_rank"] == 32
    other = copy.deepcopy(fitted)
    assert other.params()["weights"] != params["weights"]
    other.set_params(json.loads(json.dumps(params)))
    assert other.params() == params
    q = queries(hybrid, sample["ds"])["favourites"]
    items = np.arange(sample["ds"].n_items)
    np.testing.assert_array_equal(other.score(q, items), hybrid.score(q, items))


# ---- day one -----------------------------------------------------------------------------------
def test_day_one_moves_cold_anime_to_the_text_group_and_leaves_warm_ones(hybrid, sample):
    g = by_group(hybrid)
    warm, paired, text = g[WARM][:10], g[PAIRED][:10], g[TEXT][:3]
    asked = np.r_[warm, paired, text]
    group, q = hybrid.group.copy(), hybrid.q.copy()
    view = hybrid.day_one(asked)
    np.testing.assert_array_equal(view.group[np.r_[paired, text]], TEXT)
    np.testing.assert_array_equal(view.q[np.r_[paired, text]], 0.0)
    np.testing.assert_array_equal(view.group[warm], WARM)
    np.testing.assert_array_equal(view.q[warm], q[warm])
    untouched = np.setdiff1d(np.arange(len(group)), asked)
    np.testing.assert_array_equal(view.group[untouched], group[untouched])
    np.testing.assert_array_equal(view.q[untouched], q[untouched])
    # the model itself is unchanged
    np.testing.assert_array_equal(hybrid.group, group)
    np.testing.assert_array_equal(hybrid.q, q)
    # warm anime score the same in the view; moved paired anime do not
    queries_ = queries(hybrid, sample["ds"])
    for kind, qs in queries_.items():
        np.testing.assert_allclose(view.score(qs, warm), hybrid.score(qs, warm), rtol=1e-6, atol=1e-6)
        assert not np.allclose(view.score(qs, paired), hybrid.score(qs, paired)), kind
        # and the view is still one dot product
        assert np.abs(served_scores(view, qs) - view.score(qs, np.arange(len(group)))).max() < 1e-4
    # a moved anime's vector is what an anime added at serving time with the same content gets
    moved = np.r_[paired, text]
    np.testing.assert_allclose(
        view.serving_item_vectors(moved), hybrid.serving_item_vectors(content=hybrid.C[moved]), rtol=1e-5, atol=1e-6
    )
    # a catalogue anime with its content row given again keeps its audience
    np.testing.assert_allclose(
        hybrid.serving_item_vectors(warm, content=hybrid.C[warm]),
        hybrid.serving_item_vectors(warm),
        rtol=1e-5,
        atol=1e-6,
    )


# ---- tuning ------------------------------------------------------------------------------------
FAV_TARGET_POP = (3.0, 1.0, 0.0, 0.2)  # per liked-list size bucket (own:1, own:3, own:5, own:10)


def synthetic_objective(hy: Hybrid, parts: dict, calls: list):
    """A validation objective with a known optimum, read from the weights being tuned.

    own         users: best at content 0.35 and prior 0.5 for long lists; favourites (own:k): best
                at content 1.5 (the grid's edge) and one prior weight per list size. A text offset
                above 1 costs own recall (3% a unit), and for known users a paired offset above 0
                too (4% a unit).
    any other   (stage 2's "mix", "mix_new", ... and the report's "cold", "new"): best at text
                offset 3.5; paired offset best at 0.5 for known users, ever better for favourites
                (up to the grid's edge); more content weight on the text group always helps a
                little (up to the edge). "mix_new" one lower: a shift changes no optimum."""

    def objective(scorer, request, target):
        calls.append((request, target))
        w = hy.weights[request]
        # the scorer weighs cached component scores with the weights being tuned
        np.testing.assert_allclose(scorer(parts), hy.combine(parts, w))
        text, paired = w.offset["text"], w.offset["paired"]
        if not target.startswith("own"):
            fit = -((paired - 0.5) ** 2) if request == "users" else 0.1 * paired
            return -((text - 3.5) ** 2) + fit + 0.01 * hy.items.beta_content["text"] - (target == "mix_new")
        cost = 0.03 * max(0.0, text - 1.0)
        if request == "users":
            assert target == "own"
            return 1.0 - 0.1 * abs(w.content - 0.35) - 0.05 * abs(w.pop[3] - 0.5) - cost - 0.04 * max(0.0, paired)
        b = {"own:1": 0, "own:3": 1, "own:5": 2, "own:10": 3}[target]
        return 1.0 - 0.1 * abs(w.content - 1.5) - 0.1 * abs(w.pop[b] - FAV_TARGET_POP[b]) - cost

    return objective


def tuned(fitted, sample, tolerance, calls=None) -> Hybrid:
    hy = copy.deepcopy(fitted)
    parts = hy.component_scores(queries(hy, sample["ds"])["users"], np.arange(0, sample["ds"].n_items, 4))
    hy.tune(synthetic_objective(hy, parts, [] if calls is None else calls), tolerance=tolerance)
    return hy


def test_tuning_finds_the_own_optimum_then_calibrates_the_groups(fitted, sample):
    calls: list = []
    hy = tuned(fitted, sample, None, calls)
    own_targets = {r: {t for q, t in calls if q == r and t.startswith("own")} for r in ("users", "favourites")}
    assert own_targets == {"users": {"own"}, "favourites": {"own:1", "own:3", "own:5", "own:10"}}
    for request in ("users", "favourites"):  # stage 2 and the report: the mix and cold anime
        assert {t for q, t in calls if q == request} >= {"mix", "mix_new", "cold", "new"}
    users, fav = hy.weights["users"], hy.weights["favourites"]
    # stage 1: the own scenario's optimum
    assert (users.cf, users.content, users.pop) == (1.0, 0.35, [0.0, 0.0, 0.0, 0.5])
    assert (fav.cf, fav.content, fav.pop) == (1.0, 1.5, list(FAV_TARGET_POP))
    # stage 2, no floor: the mix's optimum, whatever it costs the own scenario
    assert users.offset == {"warm": 0.0, "paired": 0.5, "text": 3.5}
    assert fav.offset == {"warm": 0.0, "paired": 4.0, "text": 3.5}
    assert hy.items.beta_content == {"warm": 1.0, "paired": 1.0, "text": 12.0}  # tuned once, with known users
    assert hy.items.beta_cf == {"warm": 1.0, "paired": 1.0, "text": 0.0}
    t = hy.tuning["users"]
    assert t["tolerance"] is None and t["floor"] is None
    assert t["own_stage1"] == pytest.approx(1.0) and t["own"] == pytest.approx(1.0 - 0.075 - 0.02)
    assert t["mix"] == pytest.approx(0.12) and t["mix_new"] == pytest.approx(t["mix"] - 1.0)
    assert t["weights"] == users.as_dict() and hy.tuning["favourites"]["weights"] == fav.as_dict()
    # the text weights are never tuned: free text is content alone
    assert hy.weights["text"].as_dict() == fitted.weights["text"].as_dict()


@pytest.mark.parametrize("tolerance, text, paired", [(0.05, 2.5, 0.0), (0.0, 1.0, 0.0)])
def test_a_tolerance_keeps_the_own_scenario_above_its_floor(fitted, sample, tolerance, text, paired):
    """With 5%: the text offset climbs to 2.5 (4.5% of own recall; 2.75 would cost 5.25%) and the
    remaining 0.5% allows no paired offset above 0 for known users. With 0: only what is free."""
    hy = tuned(fitted, sample, tolerance)
    assert hy.weights["users"].offset == {"warm": 0.0, "paired": paired, "text": text}
    assert hy.weights["favourites"].offset == {"warm": 0.0, "paired": 4.0, "text": text}
    for request in ("users", "favourites"):
        t = hy.tuning[request]
        assert t["tolerance"] == tolerance and t["floor"] == pytest.approx(t["own_stage1"] * (1 - tolerance))
        assert t["floor"] - 1e-9 <= t["own"] <= t["own_stage1"]


def test_tuned_weights_lie_on_their_grids_and_edge_values_are_reported(fitted, sample):
    hy = tuned(fitted, sample, 0.05)
    for request in ("users", "favourites"):
        w = hy.weights[request]
        assert w.content in GRIDS["content"] and all(p in GRIDS["pop"] for p in w.pop)
        assert all(w.offset[g] in GRIDS["offset"] for g in ("paired", "text")) and w.offset["warm"] == 0.0
    assert all(hy.items.beta_content[g] in GRIDS["beta"] for g in ("paired", "text"))
    assert hy.items.beta_cf["paired"] in GRIDS["beta"] and hy.items.beta_cf["text"] == 0.0  # text anime have no cf
    # weights on the edge of their grid (a 0 prior or offset is a choice, not a saturation)
    assert hy.tuning["users"]["saturated"] == hy.saturated("users") == ["beta_content.text=12.0"]
    assert (
        hy.tuning["favourites"]["saturated"]
        == hy.saturated("favourites")
        == ["content=1.5", "pop[0]=3.0", "offset.paired=4.0", "beta_content.text=12.0"]
    )


def test_stage_one_ranks_warm_anime_only(fitted):
    """Every stage-1 evaluation sees the cold groups at the OUT offset; stage 2 never does."""
    hy = copy.deepcopy(fitted)
    seen = []

    def objective(scorer, request, target):
        seen.append((request, target, dict(hy.weights[request].offset)))
        return 0.5

    hy.tune(objective)
    out = {"warm": 0.0, "paired": OUT, "text": OUT}
    for request in ("users", "favourites"):
        calls = [(t, o) for r, t, o in seen if r == request]
        stage2 = next(i for i, (_, o) in enumerate(calls) if o != out)
        assert stage2 > 0 and all(t.startswith("own") for t, _ in calls[:stage2])
        assert all(o != out for _, o in calls[stage2:])
        assert {t for t, _ in calls[stage2:]} >= {"mix", "mix_new", "cold", "new"}
    # a flat objective moves nothing: no weight on an edge
    assert hy.weights["users"].offset == {"warm": 0.0, "paired": 0.0, "text": 0.0}
    assert hy.saturated("users") == [] and hy.saturated("favourites") == []

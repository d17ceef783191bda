"""An Experiment run with a popularity ranking on the hand-built dataset, and the report it writes.

Popularity ranks items in index order on this dataset (conftest.py); `EveryItem` ranks the anime
without training positives too (after the others, in index order), so every number below is
worked out from the scenario tables in test_scenarios.py. The real Popularity cannot score those
anime: what the protocol does with unscorable items is tested on its own."""

import json
import math

import matplotlib.image
import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.data.dataset import Dataset
from anime2vec.evaluation import Experiment, write_report
from anime2vec.models.popularity import Popularity

L = math.log2
PCT_ZERO, PCT_ONE, PCT_1, PCT_0 = 100 * 2.5 / 12, 100 * 7.5 / 12, 100 * 10.5 / 12, 100 * 11.5 / 12


class EveryItem(Popularity):
    """Popularity that also scores anime nobody interacted with (count 0, ranked last by index)."""

    def scorable(self, items):
        return np.ones(len(items), bool)


@pytest.fixture
def results(tiny, titles, space):
    exp = Experiment(
        tiny,
        [EveryItem(seed=None)],
        split="test",
        ks=(2, 10),
        fav_ks=(1, 2),
        diversity_space=space,
        titles=titles,
        batch_size=2,
    )  # batch 2: chunks are averaged
    return exp.run(progress=False)


def test_cold_test_items_by_hand(results):
    v = lambda m: results.value("popularity", "cold_test_items", m)  # noqa: E731
    # ranked [10, 11] for users 0 {10,11}, 2 {10,11}, 5 {11}
    assert v("recall@2") == pytest.approx(1.0)
    assert v("ndcg@2") == pytest.approx((1 + 1 + 1 / L(3)) / 3)
    assert v("mrr") == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert v("coverage@2") == pytest.approx(1.0)
    assert v("popularity_pct@2") == pytest.approx(PCT_ZERO)
    assert v("diversity@2") == pytest.approx(1.0)
    curve = results.curves.query("scenario == 'cold_test_items'")["recall"].to_numpy()
    np.testing.assert_allclose(curve, [1 / 3] + [1.0] * 9)


def test_cold_whole_by_hand(results):
    v = lambda m: results.value("popularity", "cold_whole", m)  # noqa: E731
    # after exclusions: user 0 finds 10, 11 at ranks 6, 7; user 2 at 8, 9; user 5 finds 11 at 11
    assert v("recall@2") == 0.0
    assert v("recall@10") == pytest.approx(2 / 3)
    ideal = 1 + 1 / L(3)
    assert v("ndcg@10") == pytest.approx(((1 / L(7) + 1 / L(8)) / ideal + (1 / L(9) + 1 / L(10)) / ideal) / 3)
    assert v("mrr") == pytest.approx((1 / 6 + 1 / 8 + 1 / 11) / 3)  # full ranking, beyond k
    # top-2 lists [5, 6], [2, 3], [0, 1]: 6 of 12 items
    assert v("coverage@2") == pytest.approx(0.5)
    assert v("popularity_pct@2") == pytest.approx((PCT_ONE + PCT_ONE + (PCT_0 + PCT_1) / 2) / 3)
    assert v("diversity@2") == pytest.approx(((1 - 1 / math.sqrt(2)) + 2 + 0) / 3)


def test_nofranchise_warm_and_favourites_by_hand(results):
    v = results.value
    assert v("popularity", "cold_whole_nofranchise", "mrr") == pytest.approx((1 / 6 + 1 / 8) / 2)
    # warm: user 0 finds 4 first, user 1 finds 1 first, user 3 finds 2 second
    assert v("popularity", "warm", "mrr") == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert v("popularity", "warm", "recall@2") == pytest.approx(1.0)
    # fav_k1: liked {2}, truth {0, 7}, ranking 0,1,3,4,5,6,7 over the 8 train items
    assert v("popularity", "fav_k1", "recall@2") == pytest.approx(0.5)
    assert v("popularity", "fav_k1", "recall@10") == pytest.approx(1.0)
    assert v("popularity", "fav_k1", "coverage@2") == pytest.approx(2 / 8)
    assert v("popularity", "fav_k2", "recall@2") == pytest.approx(1.0)


def test_table_is_tidy_and_complete(results):
    t = results.table
    assert list(t.columns) == ["model", "scenario", "metric", "value", "ci_low", "ci_high", "n_queries", "split"]
    assert (t["split"] == "test").all()
    n = dict(zip(results.scenarios["name"], results.scenarios["n_queries"]))
    assert n == {
        "cold_test_items": 3,
        "cold_whole": 3,
        "cold_whole_nofranchise": 2,
        "new_test_items": 3,
        "new_whole": 3,
        "new_whole_nofranchise": 2,
        "warm": 3,
        "fav_k1": 1,
        "fav_k2": 1,
    }
    for name, g in t.groupby("scenario"):
        assert (g["n_queries"] == n[name]).all()
        assert set(g["metric"]) == {
            "recall@2",
            "recall@10",
            "ndcg@2",
            "ndcg@10",
            "mrr",
            "coverage@2",
            "popularity_pct@2",
            "diversity@2",
        }
    # bootstrap intervals over users for the per-query metrics, none for list-level ones
    per_query = t["metric"].str.match(r"(recall|ndcg)@|mrr$")
    q = t[per_query]
    assert (q["ci_low"] <= q["value"] + 1e-12).all() and (q["value"] <= q["ci_high"] + 1e-12).all()
    assert t[~per_query][["ci_low", "ci_high"]].isna().all().all()
    warm_recall = t[(t["scenario"] == "cold_whole") & (t["metric"] == "recall@10")].iloc[0]
    assert warm_recall["ci_low"] < warm_recall["ci_high"]  # 3 users with recall 1, 1, 0: the mean can move
    assert results.curves.groupby(["model", "scenario"]).size().eq(10).all()
    assert results.models["popularity"]["fit_seconds"] is not None


def test_max_queries_caps_every_scenario(tiny):
    r = Experiment(tiny, [Popularity(seed=None)], split="test", ks=(2, 10), fav_ks=(1, 2), max_queries=2).run(
        progress=False
    )
    assert r.scenarios["n_queries"].max() == 2
    assert r.table["n_queries"].max() == 2
    assert any("diversity" in note for note in r.notes) and any("nofranchise" in n for n in r.notes)


def test_experiment_rejects_bad_setups(tiny):
    with pytest.raises(ValueError, match="distinct names"):
        Experiment(tiny, [Popularity(seed=None), Popularity(seed=None)])
    with pytest.raises(ValueError, match="split"):
        Experiment(tiny, [Popularity(seed=None)], split="train")
    with pytest.raises(ValueError, match="diversity_space"):
        Experiment(tiny, [Popularity(seed=None)], diversity_space=np.zeros((3, 2)))
    fitted_elsewhere = Popularity(seed=None).fit(tiny.train[:, :5])
    with pytest.raises(ValueError, match="fitted on"):
        Experiment(tiny, [fitted_elsewhere], fav_ks=(1, 2)).run(progress=False)


def test_write_report(results, tmp_path, tiny):
    paths = write_report(
        results,
        tmp_path / "out",
        title="Tiny evaluation",
        command="anime2vec evaluate --split test",
        dataset_description=tiny.describe(),
    )
    md, js, *pngs = paths
    assert [p.name for p in paths] == ["report.md", "report.json", "recall_curves.png", "diversity_accuracy.png"]
    text = md.read_text()
    assert "`anime2vec evaluate --split test`" in text
    assert "| popularity |" in text and "### cold_whole_nofranchise" in text
    assert "## Favourites queries (cold users)" in text
    doc = json.loads(js.read_text())
    assert doc["split"] == "test" and doc["dataset"]["test_items"] == 2
    mrr = [m for m in doc["metrics"] if m["scenario"] == "warm" and m["metric"] == "mrr"]
    assert mrr[0]["value"] == pytest.approx(5 / 6)
    assert len(doc["recall_curves"]["cold_test_items"]["popularity"]) == 10
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_bolds_the_best_value_per_column(tiny, tmp_path):
    class Reversed(Popularity):
        name = "reverse-popularity"

        def score(self, queries, items):
            return -super().score(queries, items)

    r = Experiment(tiny, [Popularity(seed=None), Reversed()], split="test", ks=(2, 10), fav_ks=(1, 2)).run(
        progress=False
    )
    text = write_report(r, tmp_path, "t", "cmd", {})[0].read_text()
    table = text.split("### warm")[1].split("\n\n")[2].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    pop = dict(zip(header, [c.strip() for c in table[2].strip("|").split("|")]))
    rev = dict(zip(header, [c.strip() for c in table[3].strip("|").split("|")]))
    # warm mrr: popularity 5/6 beats reverse; popularity percentile never bolded
    assert pop["mrr"] == "**0.8333**" and not rev["mrr"].startswith("**")
    assert not pop["popularity_pct@2"].startswith("**") and not rev["popularity_pct@2"].startswith("**")


class Constant(EveryItem):
    """Scores every item the same: all its rankings are ties."""

    name = "constant"

    def score(self, queries, items):
        return np.zeros((len(queries), len(items)), np.float32)


def test_ties_are_broken_at_random_not_by_item_index():
    # 20 train users, each trained on one of items 0-99 and holding test items 100-104, the
    # lowest-index test items: an index-order tie-break would rank them first (recall@20 = 1, MRR = 1)
    n_users, n_items = 20, 200
    train = sp.csr_matrix(
        (np.ones(n_users, np.float32), (np.arange(n_users), np.arange(n_users))), shape=(n_users, n_items)
    )
    cold = sp.csr_matrix(
        (np.ones(5 * n_users, np.float32), (np.repeat(np.arange(n_users), 5), np.tile(np.arange(100, 105), n_users))),
        shape=(n_users, n_items),
    )
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    ds = Dataset(
        item_ids=np.arange(n_items),
        user_ids=np.arange(n_users),
        train_items=np.arange(100),
        val_items=np.zeros(0, np.int64),
        test_items=np.arange(100, 200),
        train_users=np.arange(n_users),
        val_users=np.zeros(0, np.int64),
        test_users=np.zeros(0, np.int64),
        train=train,
        warm_val=empty,
        warm_test=empty,
        cold_val=empty,
        cold_test=cold,
        heldout=empty,
    )
    run = lambda: Experiment(ds, [Constant()], ks=(20, 100), fav_ks=()).run(progress=False)  # noqa: E731
    r = run()
    assert r.value("constant", "cold_test_items", "recall@20") < 0.6
    assert r.value("constant", "cold_test_items", "mrr") < 0.5
    assert r.value("constant", "cold_test_items", "recall@100") == pytest.approx(1.0)
    assert r.table.equals(run().table)  # seeded: the same every run
    assert any("warm skipped" in n for n in r.notes)


def test_unscorable_items_rank_below_every_scored_one(tiny, titles):
    """The real Popularity has no count for anime nobody interacted with (cold items 8-11 and train
    item 7): they are never recommended and rank last, so every cold scenario scores 0 and the
    rest is as if they were not candidates."""
    r = Experiment(tiny, [Popularity(seed=None)], split="test", ks=(2, 10), fav_ks=(1, 2), titles=titles).run(
        progress=False
    )
    for sc in ("cold_test_items", "cold_whole", "cold_whole_nofranchise", "new_test_items", "new_whole"):
        for metric in ("recall@10", "ndcg@10", "mrr"):
            assert r.value("popularity", sc, metric) == 0.0, (sc, metric)
    # top-2 lists without the unscorable items: cold_test_items has no scorable candidate at all
    assert r.value("popularity", "cold_test_items", "coverage@2") == 0.0
    # warm and fav_k2 have no unscorable target: the same numbers as when those anime ranked last
    everything = Experiment(tiny, [EveryItem(seed=None)], split="test", ks=(2, 10), fav_ks=(1, 2), titles=titles).run(
        progress=False
    )
    for sc in ("warm", "fav_k2"):
        for metric in ("recall@2", "recall@10", "mrr"):
            assert r.value("popularity", sc, metric) == pytest.approx(everything.value("popularity", sc, metric))
    # fav_k1's truth {0, 7}: item 7 is found at rank 7 when scorable, never when not
    assert everything.value("popularity", "fav_k1", "recall@10") == pytest.approx(1.0)
    assert r.value("popularity", "fav_k1", "recall@10") == pytest.approx(0.5)


class ForgetsOnDayOne(EveryItem):
    """Knows something about anime after they air (here: a big bonus for item 11) that its
    `day_one` view does not have."""

    name = "forgets"
    asked: list = []

    def score(self, queries, items):
        s = super().score(queries, items)
        return s + np.where(np.asarray(items) == 11, 10.0, 0.0)[None, :].astype(np.float32)

    def day_one(self, items):
        ForgetsOnDayOne.asked.append(sorted(np.asarray(items).tolist()))
        return EveryItem(seed=None).fit(self.train)


def test_new_scenarios_score_every_never_seen_anime_as_brand_new(tiny, titles):
    ForgetsOnDayOne.asked = []
    r = Experiment(
        tiny, [EveryItem(seed=None), ForgetsOnDayOne(seed=None)], split="test", ks=(2, 10), fav_ks=(1, 2), titles=titles
    ).run(progress=False)
    # the day-one view was asked for every anime without training interactions (val and test items),
    # once per new_* scenario
    assert ForgetsOnDayOne.asked == [[8, 9, 10, 11]] * 3
    v = r.value
    # a model without post-release knowledge scores the same on day one
    for metric in ("recall@2", "recall@10", "mrr"):
        for cold, new in (("cold_test_items", "new_test_items"), ("cold_whole", "new_whole")):
            assert v("popularity", new, metric) == pytest.approx(v("popularity", cold, metric))
            assert v("forgets", new, metric) == pytest.approx(v("popularity", cold, metric))
    # the bonus puts item 11 first in the catalogue for everybody; on day one it is gone
    assert v("forgets", "cold_whole", "recall@2") > v("forgets", "new_whole", "recall@2")
    assert v("forgets", "cold_whole", "mrr") == pytest.approx(1.0)

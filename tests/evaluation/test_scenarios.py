"""Scenario construction on the hand-built dataset (tests/evaluation/conftest.py)."""

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.evaluation import franchise_key, same_franchise, scenarios
from anime2vec.evaluation.protocol import _franchise_hits


def by_name(scs):
    return {s.name: s for s in scs}


def rows(m):
    return [sorted(m[r].indices.tolist()) for r in range(m.shape[0])]


def test_scenario_names_and_families(tiny, titles):
    scs = scenarios(tiny, "test", fav_ks=(1, 2), titles=titles)
    assert [s.name for s in scs] == [
        "cold_test_items",
        "cold_whole",
        "cold_whole_nofranchise",
        "new_test_items",
        "new_whole",
        "new_whole_nofranchise",
        "warm",
        "fav_k1",
        "fav_k2",
    ]
    assert [s.family for s in scs] == ["cold"] * 6 + ["warm", "favourites", "favourites"]
    assert all(s.split == "test" for s in scs)
    # without titles the franchise scenario is left out
    assert "cold_whole_nofranchise" not in by_name(scenarios(tiny, "test", fav_ks=(1, 2)))


def test_new_scenarios_are_the_cold_ones_with_every_never_seen_anime_brand_new(tiny, titles):
    for split in ("val", "test"):
        s = by_name(scenarios(tiny, split, fav_ks=(1, 2), titles=titles))
        for name in ("test_items", "whole", "whole_nofranchise"):
            cold, new = s[f"cold_{name}"], s[f"new_{name}"]
            assert cold.day_one is None
            # items 8-11: the val and test items (item 7 is a train item, only without positives)
            np.testing.assert_array_equal(new.day_one, [8, 9, 10, 11])
            np.testing.assert_array_equal(new.users, cold.users)
            np.testing.assert_array_equal(new.candidates, cold.candidates)
            assert rows(new.truth) == rows(cold.truth)
            assert (cold.exclude is None) == (new.exclude is None)
            if cold.exclude is not None:
                assert rows(new.exclude) == rows(cold.exclude)
        assert all(x.day_one is None for x in s.values() if not x.name.startswith("new_"))


def test_cold_items_scenarios(tiny):
    s = by_name(scenarios(tiny, "test", fav_ks=(1, 2)))
    ti, whole = s["cold_test_items"], s["cold_whole"]
    # train users with a cold_test positive: 0, 2, 5
    np.testing.assert_array_equal(ti.users, [0, 2, 5])
    np.testing.assert_array_equal(ti.queries.users, [0, 2, 5])
    np.testing.assert_array_equal(ti.candidates, [10, 11])
    assert rows(ti.truth) == [[10, 11], [10, 11], [11]]
    assert ti.exclude is None
    np.testing.assert_array_equal(whole.queries.users, [0, 2, 5])
    np.testing.assert_array_equal(whole.candidates, np.arange(12))
    assert rows(whole.truth) == rows(ti.truth)
    # every known positive that is not a target: user 0 = train {0,1,2} + warm_val {3} + warm_test {4};
    # user 2 = train {1,4} + warm_val {0}; user 5 = train {6}
    assert rows(whole.exclude) == [[0, 1, 2, 3, 4], [0, 1, 4], [6]]


def test_cold_items_on_val(tiny):
    s = by_name(scenarios(tiny, "val", fav_ks=(1, 2)))
    ti = s["cold_test_items"]
    np.testing.assert_array_equal(ti.users, [1, 4])
    np.testing.assert_array_equal(ti.candidates, [8, 9])
    assert rows(ti.truth) == [[8], [9]]
    # user 1: train {0,3} + warm_test {1}; user 4: train {0,1}
    assert rows(s["cold_whole"].exclude) == [[0, 1, 3], [0, 1]]


def test_warm_scenario_excludes_other_heldout_positives(tiny):
    w = by_name(scenarios(tiny, "test", fav_ks=(1, 2)))["warm"]
    np.testing.assert_array_equal(w.users, [0, 1, 3])
    assert rows(w.truth) == [[4], [1], [2]]
    np.testing.assert_array_equal(w.candidates, np.arange(12))
    # user 0: train {0,1,2} + warm_val {3} + cold_test {10,11}; user 1: train {0,3} + cold_val {8}
    assert rows(w.exclude) == [[0, 1, 2, 3, 10, 11], [0, 3, 8], [0, 5]]
    v = by_name(scenarios(tiny, "val", fav_ks=(1, 2)))["warm"]
    np.testing.assert_array_equal(v.users, [0, 2])
    assert rows(v.truth) == [[3], [0]]
    assert rows(v.exclude) == [[0, 1, 2, 4, 10, 11], [1, 4, 10, 11]]


def test_no_target_is_ever_excluded_or_in_a_query_history(tiny, titles):
    for split in ("val", "test"):
        for s in scenarios(tiny, split, fav_ks=(1, 2), titles=titles):
            truth = s.truth.toarray() > 0
            if s.exclude is not None:
                assert not (truth & (s.exclude.toarray() > 0)).any(), s.name
            history = s.queries.history_matrix(tiny.train).toarray() > 0
            assert not (truth & history).any(), s.name
            # histories hold train items only: no val/test item leaks into a query
            assert not history[:, np.r_[tiny.val_items, tiny.test_items]].any(), s.name
            # every target is a candidate
            assert set(np.flatnonzero(truth.any(axis=0))) <= set(s.candidates.tolist()), s.name
            if s.family != "favourites":
                assert set(s.users.tolist()) <= set(tiny.train_users.tolist())


def test_favourites_take_the_top_confidence_items(tiny):
    s = by_name(scenarios(tiny, "test", fav_ks=(1, 2)))
    f1, f2 = s["fav_k1"], s["fav_k2"]
    # test users with >= 3 held-out positives: only user 8 (confidences 0:1, 2:3, 7:2)
    np.testing.assert_array_equal(f1.users, [8])
    np.testing.assert_array_equal(f1.queries.liked[0], [2])
    np.testing.assert_array_equal(f1.queries.liked_weights[0], [3.0])
    assert rows(f1.truth) == [[0, 7]]
    assert rows(f1.exclude) == [[2]]
    np.testing.assert_array_equal(f2.queries.liked[0], [2, 7])
    np.testing.assert_array_equal(f2.queries.liked_weights[0], [3.0, 2.0])
    assert rows(f2.truth) == [[0]]
    np.testing.assert_array_equal(f1.candidates, np.arange(8))


def test_favourite_ties_are_seeded_and_nested(tiny):
    # val user 6: 0 (conf 5), then 1 and 2 tied at 2, then 3; user 7 has too few positives
    picks = set()
    for seed in range(12):
        s = by_name(scenarios(tiny, "val", fav_ks=(1, 2), seed=seed))
        np.testing.assert_array_equal(s["fav_k1"].users, [6])
        liked2 = s["fav_k2"].queries.liked[0].tolist()
        assert s["fav_k1"].queries.liked[0].tolist() == [0]
        assert liked2[0] == 0 and liked2[1] in (1, 2)
        other = 3 - liked2[1]
        assert rows(s["fav_k2"].truth) == [sorted([other, 3])]
        again = by_name(scenarios(tiny, "val", fav_ks=(1, 2), seed=seed))
        assert again["fav_k2"].queries.liked[0].tolist() == liked2
        picks.add(liked2[1])
    assert picks == {1, 2}  # the tie really is broken at random across seeds


def test_favourites_need_more_positives_than_the_largest_k(tiny):
    # with k up to 3 user 8 (3 positives) no longer qualifies: no favourites scenario at all
    assert not [s for s in scenarios(tiny, "test", fav_ks=(1, 3)) if s.family == "favourites"]


def test_max_queries_subsamples_deterministically_and_shares_cold_users(tiny):
    a = by_name(scenarios(tiny, "test", fav_ks=(1, 2), max_queries=2, seed=3))
    b = by_name(scenarios(tiny, "test", fav_ks=(1, 2), max_queries=2, seed=3))
    assert len(a["cold_test_items"].users) == 2
    np.testing.assert_array_equal(a["cold_test_items"].users, b["cold_test_items"].users)
    np.testing.assert_array_equal(a["cold_test_items"].users, a["cold_whole"].users)
    assert set(a["cold_test_items"].users.tolist()) <= {0, 2, 5}
    # the truth rows follow the subsampled users
    full = tiny.cold_test.toarray()
    np.testing.assert_array_equal(a["cold_whole"].truth.toarray() > 0, full[a["cold_whole"].users] > 0)
    drawn = {
        tuple(by_name(scenarios(tiny, "test", fav_ks=(1, 2), max_queries=2, seed=s))["warm"].users) for s in range(10)
    }
    assert len(drawn) > 1


def test_franchise_keys():
    assert franchise_key("Naruto: Shippuuden") == ("naruto", "shippuuden")
    assert franchise_key("Shingeki no Kyojin Season 2") == ("shingeki", "kyojin")
    assert franchise_key("The Melancholy of Haruhi Suzumiya") == ("melancholy", "haruhi")
    assert franchise_key("Pokémon") == ("pokemon",)
    assert franchise_key("!!!") == ()
    assert same_franchise(franchise_key("Naruto"), franchise_key("Naruto: Shippuuden"))
    assert same_franchise(franchise_key("Kimi no Na wa."), franchise_key("Kimi no Na wa. Special"))
    assert not same_franchise(franchise_key("Kimi no Na wa."), franchise_key("Kimi no Todoke"))
    assert not same_franchise(franchise_key("Shingeki no Kyojin"), franchise_key("Shin Sekai Yori"))
    assert not same_franchise((), ())


def test_nofranchise_sets_same_franchise_hits_aside(tiny, titles):
    s = by_name(scenarios(tiny, "test", fav_ks=(1, 2), titles=titles))["cold_whole_nofranchise"]
    # user 0 (trained on Naruto): "Naruto: Shippuuden" (10) set aside, "Kimi no Na wa. Special" (11)
    # kept ("Kimi no Todoke" is another show); user 2 keeps both; user 5 (trained on "Kimi no Na
    # wa.") loses its only target and drops out
    np.testing.assert_array_equal(s.users, [0, 2])
    assert rows(s.truth) == [[11], [10, 11]]
    # the set-aside hit is excluded from the ranking like any non-target positive
    assert rows(s.exclude) == [[0, 1, 2, 3, 4, 10], [0, 1, 4]]


def test_franchise_rule_matches_its_pairwise_definition():
    rng = np.random.default_rng(0)
    words = ["naruto", "kimi", "no", "na", "wa", "bleach", "one", "piece", "season", "2"]
    titles = np.array([" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(40)])
    history = sp.csr_matrix((rng.random((15, 40)) < 0.15).astype(np.float32))
    truth = sp.csr_matrix((rng.random((15, 40)) < 0.3).astype(np.float32))
    got = _franchise_hits(history, truth, titles).toarray() > 0
    keys = [franchise_key(t) for t in titles]
    want = np.zeros_like(got)
    for q in range(15):
        for j in truth[q].indices:
            want[q, j] = any(same_franchise(keys[j], keys[i]) for i in history[q].indices)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


def test_bad_arguments(tiny, titles):
    with pytest.raises(ValueError, match="split"):
        scenarios(tiny, "train")
    with pytest.raises(ValueError, match="titles"):
        scenarios(tiny, "test", titles=titles[:3])

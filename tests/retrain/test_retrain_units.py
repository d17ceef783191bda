"""The pieces of retraining that need no training: events → holdout and interactions, the dataset
hook's routing, the gate rule, the read-only snapshot of a live feedback store, decision metrics
(textfile and a real Pushgateway-style HTTP endpoint)."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anime2vec.feedback import COLUMNS, FeedbackEvent, FeedbackStore
from anime2vec.pipeline import TrainConfig
from anime2vec.retrain import (
    DECISION_LOG,
    Decision,
    FeedbackData,
    append_decision,
    base_dataset,
    compare,
    export_metrics,
    extend_dataset,
    gate,
    prepare_feedback,
    read_events,
)


@pytest.fixture(scope="module")
def sample():
    data, ds = base_dataset(TrainConfig(sample=True))
    return data, ds


def _events(rows) -> pd.DataFrame:
    """rows: (event_id, user_id, anime_id, kind, score) in arrival order, one second apart."""
    df = pd.DataFrame(
        [(eid, u, a, k, np.nan if s is None else s, np.nan, 1000.0 + n) for n, (eid, u, a, k, s) in enumerate(rows)],
        columns=COLUMNS,
    )
    return df.astype({"user_id": np.int64, "anime_id": np.int64, "score": np.float64, "occurred_at": np.float64})


def _entry(ds, name, uid, aid) -> float:
    return float(getattr(ds, name)[int(np.searchsorted(ds.user_ids, uid)), ds.item_index()[aid]])


def test_feedback_is_routed_by_the_base_split(sample):
    _, ds = sample
    ids = ds.item_ids
    tr, ho = int(ds.train_users[0]), int(ds.test_users[0])
    tr_user, ho_user = int(ds.user_ids[tr]), int(ds.user_ids[ho])
    wt = ds.warm_test.tocoo()
    j = int(np.flatnonzero(wt.row != tr)[0])
    wt_user, wt_item = int(ds.user_ids[wt.row[j]]), int(ids[wt.col[j]])
    liked_train = int(ids[ds.train[tr].indices[0]])  # a training positive the user now drops
    known = ds.train + ds.warm_val + ds.warm_test + ds.cold_val + ds.cold_test + ds.heldout
    unseen_train = int(ids[np.setdiff1d(ds.train_items, np.union1d(known[tr].indices, known[ho].indices))[0]])
    val_item, test_item = int(ids[ds.val_items[0]]), int(ids[ds.test_items[0]])
    extra = pd.DataFrame(
        [
            (tr_user, unseen_train, 4.2),
            (tr_user, val_item, 3.4),
            (tr_user, liked_train, 0.0),
            (ho_user, unseen_train, 5.0),
            (ho_user, test_item, 5.0),
            (wt_user, wt_item, 1.8),  # a warm-test pair stays evaluation data
            (77_000_001, unseen_train, 2.6),
            (77_000_001, test_item, 5.0),
            (77_000_002, val_item, 0.0),
            (tr_user, 99_999_999, 5.0),  # not an item of the model: ignored
        ],
        columns=["user_id", "anime_id", "confidence"],
    )
    out = extend_dataset(ds, extra)

    assert np.array_equal(out.item_ids, ds.item_ids) and np.array_equal(out.test_items, ds.test_items)
    assert out.n_users == ds.n_users + 1  # 77_000_002 liked nothing: not a user
    new = int(np.searchsorted(out.user_ids, 77_000_001))
    assert new in set(out.train_users.tolist())
    assert set(out.user_ids[out.test_users].tolist()) == set(ds.user_ids[ds.test_users].tolist())
    assert _entry(out, "train", tr_user, unseen_train) == pytest.approx(4.2)
    assert _entry(out, "cold_val", tr_user, val_item) == pytest.approx(3.4)
    assert _entry(out, "train", tr_user, liked_train) == 0.0
    assert _entry(out, "heldout", ho_user, unseen_train) == pytest.approx(5.0)
    assert _entry(out, "train", ho_user, unseen_train) == 0.0  # a favourites user stays out of training
    assert _entry(out, "heldout", ho_user, test_item) == 0.0 and _entry(out, "cold_test", ho_user, test_item) == 0.0
    assert _entry(out, "warm_test", wt_user, wt_item) == pytest.approx(1.8)
    assert _entry(out, "train", wt_user, wt_item) == 0.0
    assert _entry(out, "train", 77_000_001, unseen_train) == pytest.approx(2.6)
    assert _entry(out, "cold_test", 77_000_001, test_item) == pytest.approx(5.0)

    # every untouched entry is where it was
    def total(d):
        return sum(getattr(d, n).nnz for n in ("train", "warm_val", "warm_test", "cold_val", "cold_test", "heldout"))

    assert total(out) == total(ds) + 5 - 1  # 5 new pairs, 1 updated in place, 1 removed
    assert out.params["feedback"]["new_users"] == 1 and out.params["feedback"]["removed"] == 1


def test_events_are_validated_capped_and_the_most_recent_held_out(sample):
    data, ds = sample
    ids = [int(a) for a in ds.item_ids[ds.train_items[:12]]]
    base_user = int(ds.user_ids[ds.train_users[0]])
    already = int(data.interactions.loc[data.interactions["user_id"] == base_user, "anime_id"].iloc[0])
    no_text = 123_456_789
    catalog = pd.concat([data.catalog, data.catalog.iloc[:1].rename(index={data.catalog.index[0]: no_text})])
    rows = [(f"a{j}", 1, a, "rated", 9) for j, a in enumerate(ids[:10])]  # 10 events: 2 held out
    rows += [(f"b{j}", 2, a, "completed", None) for j, a in enumerate(ids[:3])]  # too few: none held out
    rows += [
        ("c0", base_user, ids[0], "rated", 8),
        ("c1", base_user, ids[1], "rated", 7),
        ("c2", base_user, ids[2], "added", None),
        ("c3", base_user, ids[3], "dropped", None),
        ("c4", base_user, already, "rated", 10),
    ]  # held out, but already listed
    rows += [
        ("x1", 3, 99_999_999, "rated", 9),
        ("x2", 3, no_text, "rated", 9),
        ("x3", 3, ids[0], "bogus", None),
        ("x4", 3, ids[0], "rated", 11),
    ]
    rows += [(f"d{j}", 4, ids[j % 12], "rated", 8) for j in range(30)]  # over the cap of 20
    fb = prepare_feedback(
        _events(rows),
        catalog,
        ds.item_ids,
        data.interactions,
        holdout_frac=0.2,
        holdout_min_events=5,
        max_events_per_user=20,
    )

    c = fb.counts
    assert (
        c["skipped_unknown_anime"],
        c["skipped_anime_without_text"],
        c["skipped_invalid"],
        c["skipped_over_user_cap"],
    ) == (1, 1, 2, 10)
    assert c["used"] == 10 + 3 + 5 + 20 and c["heldout"] == 2 + 0 + 1 + 4
    assert [e.event_id for e in fb.train_events[1]] == [f"a{j}" for j in range(8)]
    assert [e.event_id for e in fb.train_events[4]][0] == "d10"  # the 10 oldest were capped
    recent = {q.user_id: q for q in fb.recent}
    assert sorted(recent[1].truth.tolist()) == sorted(ids[8:10])
    assert base_user not in recent  # its held-out anime was already on its list
    assert 2 not in recent and 4 not in recent  # 4's held-out items repeat its training ones
    inter = fb.interactions.set_index(["user_id", "anime_id"])["confidence"]
    assert inter[(base_user, ids[0])] == pytest.approx(3.4) and inter[(base_user, ids[2])] == 0.0
    assert (1, ids[8]) not in inter.index  # held out of training
    assert len(fb.fingerprint) == 64


def test_the_gate_allows_noise_and_refuses_real_regressions():
    rng = np.random.default_rng(0)
    cur = rng.random(2000)
    # 5% worse on every query: far beyond both 2% of the current value and its standard error
    c = compare("warm/recall@100", cur, cur * 0.95, tolerance=0.02, noise_z=2.0)
    assert c.regressed and c.relative_drop == pytest.approx(0.05) and c.se < 0.01
    # 1% worse: within the tolerance
    assert not compare("warm/recall@100", cur, cur * 0.99, tolerance=0.02, noise_z=2.0).regressed
    # 10% worse on average on 8 noisy queries: within two standard errors, so not a regression ...
    few, noise = rng.random(8), rng.normal(0, 0.3, 8)
    cand = few - 0.1 * few.mean() + noise - noise.mean()
    noisy = compare("fav_k5/recall@100", few, cand, tolerance=0.02, noise_z=2.0)
    assert noisy.relative_drop == pytest.approx(0.1) and not noisy.regressed
    # ... unless the noise allowance is switched off
    assert compare("fav_k5/recall@100", few, cand, tolerance=0.02, noise_z=0.0).regressed

    ones, half = {"warm/recall@100": np.ones(50)}, {"warm/recall@100": np.full(50, 0.5)}
    passed, checks, reasons = gate(ones, half, half, ("warm/recall@100", "recent/recall@100"), 0.02, 2.0)
    assert not passed and checks[0].regressed and reasons[0].startswith("warm/recall@100: 1.0000 → 0.5000 (-50.0%")
    assert any("recent/recall@100: no query" in r for r in reasons)
    # first bundle: the absolute floor against the popularity fallback
    assert gate(None, ones, half, ("warm/recall@100",), 0.02, 2.0)[0]
    passed, _, reasons = gate(None, half, ones, ("warm/recall@100",), 0.02, 2.0)
    assert not passed and "does not beat the popularity fallback" in reasons[0]


def test_events_are_read_from_a_read_only_snapshot_of_a_live_store(tmp_path):
    live = tmp_path / "feedback.sqlite"
    fs = FeedbackStore(live)  # the ranker's connection stays open, as in production
    try:
        fs.record([FeedbackEvent(f"e{i}", 5, 20 + i, "rated", 8) for i in range(3)])
        # the database and its write-ahead log (the -shm index holds readers' marks: not data)
        data = lambda: {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.endswith("-shm")}  # noqa: E731
        before = data()
        got = read_events(live)
        assert list(got["event_id"]) == ["e0", "e1", "e2"] and list(got["anime_id"]) == [20, 21, 22]
        assert data() == before and set(before) == {"feedback.sqlite", "feedback.sqlite-wal"}  # nothing written
        fs.record([FeedbackEvent("e3", 5, 30, "completed")])  # the ranker keeps writing
        assert len(read_events(live)) == 4
    finally:
        fs.close()
    from anime2vec.retrain import RetrainError

    with pytest.raises(RetrainError, match="no feedback store"):
        read_events(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


class _Pushgateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Pushgateway.received.append((self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _decision(kind: str, t: float) -> Decision:
    d = Decision(
        kind,
        "v1",
        "v2",
        passed=kind == "promoted",
        timestamp=t,
        metrics={"current": {"warm/recall@100": 0.5}, "candidate": {"warm/recall@100": 0.25}},
        details={"events": {"events": 10, "used": 7, "heldout": 2, "skipped_unknown_anime": 1, "users": 3}},
    )
    return d


def test_decisions_become_metrics_from_the_whole_log(tmp_path):
    store = tmp_path / "models"
    store.mkdir()
    for n, kind in enumerate(("refused", "promoted", "dry_run", "refused", "refused")):
        append_decision(store, _decision(kind, 1_000 + n))
    with (store / DECISION_LOG).open("a") as f:
        f.write("not json\n")  # a torn line is skipped, not fatal
    last = _decision("refused", 1_004)

    server = http.server.HTTPServer(("127.0.0.1", 0), _Pushgateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        export_metrics(
            store,
            last,
            metrics_file=tmp_path / "tf" / "retrain.prom",
            pushgateway=f"http://127.0.0.1:{server.server_port}",
        )
    finally:
        server.shutdown()
        server.server_close()
    text = (tmp_path / "tf" / "retrain.prom").read_text()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert got[("a2v_retrain_decisions_total", (("decision", "refused"),))] == 3
    assert got[("a2v_retrain_decisions_total", (("decision", "failed"),))] == 0
    assert got[("a2v_retrain_consecutive_refusals", ())] == 2
    assert got[("a2v_retrain_last_decision_timestamp_seconds", (("decision", "promoted"),))] == 1_001
    assert got[("a2v_retrain_last_decision_timestamp_seconds", (("decision", "refused"),))] == 1_004
    assert (
        got[("a2v_retrain_gate_metric", (("metric", "warm/recall@100"), ("role", "candidate"), ("version", "v2")))]
        == 0.25
    )
    assert got[("a2v_retrain_events", (("outcome", "skipped_unknown_anime"),))] == 1
    assert ("a2v_retrain_events", (("outcome", "users"),)) not in got
    ((path, body),) = _Pushgateway.received
    assert path == "/metrics/job/anime2vec-retrain"
    assert 'a2v_retrain_decisions_total{decision="refused"} 3.0' in body
    lines = [json.loads(x) for x in (store / DECISION_LOG).read_text().splitlines()[:5]]
    assert [x["decision"] for x in lines] == ["refused", "promoted", "dry_run", "refused", "refused"]
    assert lines[0]["time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_000))


def test_feedback_data_describes_itself():
    fb = FeedbackData(
        pd.DataFrame(columns=["user_id", "anime_id", "confidence"]), {}, [], {"events": 0}, "f" * 64, None
    )
    assert fb.describe() == {
        "counts": {"events": 0},
        "fingerprint": "f" * 64,
        "last_received_at": None,
        "users": 0,
        "recent_queries": 0,
    }


def test_one_retrain_at_a_time_and_a_run_that_cannot_start_is_logged(tmp_path):
    from anime2vec.retrain import RetrainConfig, RetrainError, read_decisions, run
    from anime2vec.retrain.job import _exclusive

    store = tmp_path / "models"
    cfg = RetrainConfig(train=TrainConfig(sample=True, store=store), events=(tmp_path / "feedback.sqlite",))
    with _exclusive(store):  # another run holds the store: turned away, and it is not a decision
        with pytest.raises(RetrainError, match="another retrain holds"):
            run(cfg)
    assert read_decisions(store) == []
    with pytest.raises(RetrainError, match="no feedback store"):
        run(cfg)
    (d,) = read_decisions(store)
    assert (d["decision"], d["candidate"]) == ("failed", None) and "no feedback store" in d["reasons"][0]

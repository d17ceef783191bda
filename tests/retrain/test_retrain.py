"""Retraining end to end on the sample data (tiny-random encoder, one small training config):
a base bundle is trained and promoted once for the module; feedback events that teach a new
preference produce a candidate that is trained, gated through the serving code and promoted; a
copy of the served bundle with shuffled item representations (valid checksums, wrong quality) is
refused while a running ranker keeps serving the old version; --dry-run never promotes."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anime2vec import cli
from anime2vec.bundle import list_bundles, load_bundle, write_bundle
from anime2vec.feedback import FeedbackEvent, FeedbackStore
from anime2vec.retrain import DECISION_LOG, RetrainConfig, base_dataset, run
from anime2vec.rollout import open_rollout
from anime2vec.runlocal import ServiceProcess, standard_specs
from anime2vec.v1 import common_pb2, ranker_pb2_grpc
from tests.e2e.support import STARTUP_TIMEOUT_S, free_ports
from tests.sample_bundles import fast_config, train_fast_bundle

NEW_USERS = 60
EVENTS_PER_USER = 12
FIRST_NEW_USER = 9_000_000
UNKNOWN_ANIME = (99_999_901, 99_999_902, 99_999_903)
# every item-side representation a served item vector is built from (ServingModel recomputes the
# hybrid's item vectors from its state: collaborative vector, group, prior, content), so a row
# permutation gives each anime another anime's vectors
ITEM_ARRAYS = (
    "wmf_V",
    "content",
    "tfidf_content",
    "item_tower",
    "hybrid.q",
    "hybrid.group",
    "hybrid.pop",
    "hybrid.C",
    "hybrid.item_content",
)


def copy_bundle(src: Path, store: Path, version: str, shuffle_seed: int | None = None) -> Path:
    """A new version written through write_bundle (so it verifies like any other): identical, or
    with the item-side arrays' rows permuted (only its quality is wrong)."""
    b = load_bundle(src)
    arrays = {k: v for k, v in b.arrays.items() if not k.startswith("train_")}
    if shuffle_seed is not None:
        perm = np.random.default_rng(shuffle_seed).permutation(len(b.arrays["item_ids"]))
        assert (perm != np.arange(len(perm))).mean() > 0.99
        arrays.update({k: arrays[k][perm] for k in ITEM_ARRAYS})
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "format", "version", "created_at")}
    extra = {
        rel: (src / rel).read_bytes()
        for rel in b.manifest["files"]
        if not rel.startswith("arrays/") and rel != "catalog.jsonl"
    }
    return write_bundle(store, manifest, b.catalog, arrays, b.train, version=version, extra_files=extra)


def alias_target(store: Path, data_dir: Path) -> str | None:
    r = open_rollout(store, data_dir)
    try:
        return r.index.alias_target()
    finally:
        r.close()


def last_decision(store: Path) -> dict:
    return json.loads((store / DECISION_LOG).read_text().splitlines()[-1])


def samples(path: Path) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value of a textfile exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(path.read_text())
        for s in fam.samples
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Sample-sized models are single-row math: on a shared 2-core machine torch and BLAS thread
    pools only contend (a training costs 6x the CPU with them)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one base bundle promoted in an embedded index, and a feedback store holding
    NEW_USERS new users who all rated EVENTS_PER_USER items of one cluster of 25 unpopular
    training items 9-10, plus corrupted events (unknown anime, one invalid row)."""
    root = tmp_path_factory.mktemp("retrain")
    store, data_dir, cache = root / "models", root / "ranker", root / "cache"
    cfg = fast_config(store, cache)
    base = train_fast_bundle(cfg)
    r = open_rollout(store, data_dir)
    try:
        r.build(base.name)
        r.promote(base.name)
    finally:
        r.close()

    _, ds = base_dataset(cfg)
    rng = np.random.default_rng(7)
    pop = np.asarray((ds.train > 0).sum(axis=0)).ravel()
    unpopular = ds.train_items[np.argsort(pop[ds.train_items], kind="stable")][: len(ds.train_items) // 2]
    cluster = ds.item_ids[rng.choice(unpopular, 25, replace=False)]
    fs = FeedbackStore(data_dir / "feedback.sqlite")
    try:
        for u in range(NEW_USERS):
            uid = FIRST_NEW_USER + u
            fs.record(
                [
                    FeedbackEvent(f"u{uid}-{j}", uid, int(a), "rated", int(rng.integers(9, 11)))
                    for j, a in enumerate(rng.choice(cluster, EVENTS_PER_USER, replace=False))
                ]
            )
        fs.record([FeedbackEvent(f"bad-{a}", FIRST_NEW_USER, a, "completed") for a in UNKNOWN_ANIME])
    finally:
        fs.close()
    # a row no client could have sent (the store validates): a corrupted database, not a crash
    with sqlite3.connect(data_dir / "feedback.sqlite") as db:
        db.execute(
            "INSERT INTO events VALUES ('corrupt-1', ?, ?, 'bogus', 42, NULL, ?)",
            (FIRST_NEW_USER + 1, int(cluster[0]), time.time()),
        )
    return {
        "root": root,
        "store": store,
        "data_dir": data_dir,
        "cfg": cfg,
        "base": base.name,
        "cluster": set(cluster.tolist()),
        "base_users": len(ds.user_ids),
    }


@pytest.fixture(scope="module")
def retrained(world):
    """One real retrain: train on base + events, gate against the base bundle, promote."""
    metrics_file = world["root"] / "textfile" / "retrain.prom"
    decision = run(
        RetrainConfig(
            train=world["cfg"],
            events=world["data_dir"] / "feedback.sqlite",
            ranker_data_dir=world["data_dir"],
            metrics_file=metrics_file,
        )
    )
    return decision, metrics_file


def test_events_that_teach_a_new_preference_are_trained_gated_and_promoted(world, retrained):
    d, metrics_file = retrained
    store = world["store"]
    assert (d.current, d.decision, d.passed) == (world["base"], "promoted", True), d.reasons
    assert alias_target(store, world["data_dir"]) == d.candidate != world["base"]

    # the corrupted events were skipped and counted, not fatal
    ev = d.details["events"]
    assert ev["skipped_unknown_anime"] == len(UNKNOWN_ANIME) and ev["skipped_invalid"] == 1
    assert ev["used"] == NEW_USERS * EVENTS_PER_USER and ev["heldout"] == NEW_USERS * int(0.2 * EVENTS_PER_USER)

    # the candidate learnt the new users (as training users) from the events
    m = load_bundle(store / d.candidate).manifest
    assert m["data"]["source"] == "sample+feedback"
    assert m["dims"]["n_users"] == world["base_users"] + NEW_USERS
    assert m["split"]["feedback"]["new_users"] == NEW_USERS

    # the recent-events holdout: the users' last ratings, answered as the ranker answers them
    assert d.details["queries"]["recent"] == NEW_USERS
    cur, cand = d.metrics["current"], d.metrics["candidate"]
    assert cand["recent/recall@100"] > cur["recent/recall@100"] + 0.3, (cur, cand)
    assert cand["recent/recall@20"] > cur["recent/recall@20"], (cur, cand)
    assert d.details["training_leak"] == {"current": 0.0, "candidate": 0.0}

    line = last_decision(store)
    assert (line["decision"], line["current"], line["candidate"]) == ("promoted", world["base"], d.candidate)
    assert {c["metric"] for c in line["checks"]} == {
        "warm/recall@100",
        "fav_k5/recall@100",
        "cold_whole/recall@100",
        "recent/recall@100",
    }
    assert not any(c["regressed"] for c in line["checks"])
    got = samples(metrics_file)
    assert got[("a2v_retrain_decisions_total", (("decision", "promoted"),))] == 1
    assert got[("a2v_retrain_decisions_total", (("decision", "refused"),))] == 0
    assert got[("a2v_retrain_consecutive_refusals", ())] == 0
    assert got[("a2v_retrain_events", (("outcome", "skipped_unknown_anime"),))] == len(UNKNOWN_ANIME)
    key = (
        "a2v_retrain_gate_metric",
        (("metric", "recent/recall@100"), ("role", "candidate"), ("version", d.candidate)),
    )
    assert got[key] == pytest.approx(cand["recent/recall@100"])


def _gate_cli(world, version: str, *extra: str, capsys) -> dict:
    rc = cli.main(
        [
            "retrain",
            "--sample",
            "--encoder",
            "tiny-random",
            "--quiet",
            "--events",
            str(world["data_dir"] / "feedback.sqlite"),
            "--store",
            str(world["store"]),
            "--ranker-data-dir",
            str(world["data_dir"]),
            "--candidate",
            version,
            "--metrics-file",
            str(world["root"] / "textfile" / "retrain.prom"),
            *extra,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


@pytest.fixture
def ranker(world, retrained):
    """A ranker process serving the live version and following the alias (polled every 0.2 s)."""
    live = alias_target(world["store"], world["data_dir"])
    ports = free_ports(6)
    specs = {
        s.name: s
        for s in standard_specs(
            "127.0.0.1",
            {"encoder": tuple(ports[0:2]), "ranker": tuple(ports[2:4]), "gateway": tuple(ports[4:6])},
            encoder_model="tiny-random",
            model_store=world["store"],
            bundle=live,
            ranker_data_dir=world["data_dir"],
            gateway_env={},
        )
    }
    specs["ranker"].env["ALIAS_POLL_S"] = "0.2"
    proc = ServiceProcess(
        specs["ranker"],
        world["root"] / "ranker.log",
        base_env=os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    proc.start()
    try:
        proc.wait_serving(STARTUP_TIMEOUT_S)
        with grpc.insecure_channel(specs["ranker"].address) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            yield lambda: stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model.version
    finally:
        assert proc.stop() == 0, proc.log_tail()


def test_a_candidate_with_shuffled_item_vectors_is_refused_and_the_old_version_keeps_serving(world, ranker, capsys):
    store, data_dir = world["store"], world["data_dir"]
    live = alias_target(store, data_dir)
    assert ranker() == live
    broken = copy_bundle(store / live, store, "shuffled-" + live, shuffle_seed=1)
    load_bundle(broken)  # checksums and dimensions verify: only the quality is wrong

    out = _gate_cli(world, broken.name, capsys=capsys)
    assert (out["decision"], out["current"], out["candidate"], out["passed"]) == ("refused", live, broken.name, False)
    line = last_decision(store)
    failing = {c["metric"]: c for c in line["checks"] if c["regressed"]}
    assert "warm/recall@100" in failing and "recent/recall@100" in failing, line["reasons"]
    warm = failing["warm/recall@100"]
    assert warm["candidate"] < 0.6 * warm["current"] and warm["drop"] > warm["allowed"]
    assert any(r.startswith("warm/recall@100: ") for r in line["reasons"])
    got = samples(world["root"] / "textfile" / "retrain.prom")
    assert got[("a2v_retrain_decisions_total", (("decision", "refused"),))] >= 1
    assert got[("a2v_retrain_consecutive_refusals", ())] >= 1

    assert alias_target(store, data_dir) == live
    time.sleep(2.0)  # ten alias polls
    assert ranker() == live
    # ... and the ranker does follow the alias: an equally good copy passes the gate and is served
    same = copy_bundle(store / live, store, "same-" + live)
    out = _gate_cli(world, same.name, capsys=capsys)
    assert (out["decision"], out["passed"]) == ("promoted", True), out["reasons"]
    deadline = time.monotonic() + 60
    while ranker() != same.name:
        assert time.monotonic() < deadline, "the ranker did not follow the promotion"
        time.sleep(0.2)
    got = samples(world["root"] / "textfile" / "retrain.prom")
    assert got[("a2v_retrain_consecutive_refusals", ())] == 0


def test_dry_run_evaluates_but_never_promotes(world, retrained, capsys):
    store, data_dir = world["store"], world["data_dir"]
    live = alias_target(store, data_dir)
    same = copy_bundle(store / live, store, "dry-" + live)
    out = _gate_cli(world, same.name, "--dry-run", capsys=capsys)
    assert (out["decision"], out["current"], out["passed"]) == ("dry_run", live, True)
    assert out["metrics"]["candidate"] == out["metrics"]["current"]  # the same model, measured the same way
    assert "dry run: would promote" in out["reasons"]
    assert alias_target(store, data_dir) == live
    r = open_rollout(store, data_dir)
    try:
        assert same.name not in r.index.versions()  # not even indexed
    finally:
        r.close()
    assert last_decision(store)["decision"] == "dry_run"
    assert same.name in {p.name for p in list_bundles(store)}

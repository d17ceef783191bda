"""Smoke test of `make bench`: the cheapest parts at minimal sizes, through the real code paths
(a real Qdrant edge index, real ALS, the subprocess runner, a real gRPC echo server and the load
generator), then the report files and their fields. Timings are never asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.__main__ import scale_conclusion, summary
from bench.gateway import EchoProcess, interleaved_cpu_ms
from bench.loadgen import Step, run_plan
from bench.report import markdown, write_report
from bench.scale import curve, run_scale_bench
from bench.search import run_search_bench
from bench.synthetic import DEFAULT_SHAPE, fit_power_law, interactions


def test_synthetic_interactions_keep_the_real_shape():
    m = interactions(DEFAULT_SHAPE, 3000, 5000, seed=1)
    per_user = np.diff(m.indptr)
    assert m.shape == (3000, 5000) and m.dtype == np.float32
    assert per_user.min() >= 1
    # no repeated (user, item) pair, and confidences only from the real values
    assert all(np.all(np.diff(m.indices[m.indptr[u] : m.indptr[u + 1]]) > 0) for u in range(0, 3000, 97))
    assert set(np.unique(m.data)) <= set(np.float32(DEFAULT_SHAPE.confidence_values))
    # activity and popularity follow the real data's (median 59 positives; exponent ~1.57)
    assert 40 <= np.median(per_user) <= 80
    assert abs(fit_power_law(np.bincount(m.indices, minlength=5000)) - DEFAULT_SHAPE.popularity_exponent) < 0.4


def test_curve_marks_extrapolated_points():
    measured = [{"n": 10, "y": 2.0}, {"n": 20, "y": 3.0}]
    prop = curve(measured, "n", "y", (10, 20, 40))
    assert [(p["size"], p["value"], p["extrapolated"]) for p in prop["points"]] == [
        (10, 2.0, False),
        (20, 3.0, False),
        (40, 6.0, True),
    ]
    marginal = curve(measured, "n", "y", (40,), model="marginal")
    assert marginal["points"][-1] == {"size": 40, "value": 5.0, "extrapolated": True}


def test_loadgen_drives_the_echo_server(tmp_path):
    echo = EchoProcess(100, tmp_path / "echo.log")
    try:
        steps = [
            Step("echo", echo.address, "/bench.Echo/Echo", [b"ping"], concurrency=c, duration_s=0.5, warmup_s=0.2)
            for c in (1, 4)
        ]
        steps.append(
            Step("echo", echo.address, "/bench.Echo/Echo", [b"ping"], rate_rps=50, duration_s=0.5, warmup_s=0.2)
        )
        closed1, closed4, opened = run_plan(steps)
    finally:
        echo.stop()
    for r in (closed1, closed4, opened):
        assert r["errors"] == {} and r["requests"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert closed4["concurrency"] == 4 and opened["offered_rps"] == 50 and opened["concurrency"] is None


def test_relay_passes_calls_to_the_echo_server(tmp_path):
    import grpc

    echo = EchoProcess(100, tmp_path / "echo.log")
    relay = EchoProcess(0, tmp_path / "relay.log", forward=echo.address)
    try:
        with grpc.insecure_channel(relay.address) as ch:
            # the relay itself would echo "ping" (reply_bytes 0): 100 bytes prove the call went through
            assert ch.unary_unary("/bench.Echo/Echo")(b"ping", timeout=10) == b"x" * 100
        (closed,) = run_plan(
            [Step("relay", relay.address, "/bench.Echo/Echo", [b"ping"], concurrency=4, duration_s=0.5, warmup_s=0.2)]
        )
    finally:
        relay.stop()
        echo.stop()
    assert closed["errors"] == {} and closed["requests"] > 0


@pytest.mark.timeout(120)
def test_cheapest_parts_write_a_complete_report(tmp_path):
    result = {
        "machine": {"summary": "test", "cpu_count": 2, "cuda": None, "loadavg_start": "0"},
        "started": "now",
        "quick": True,
        "errors": {},
    }
    result["search"] = run_search_bench(n_queries=5, n_items=1500, dim=32, use_bundle=False)
    result["scale"] = run_scale_bench(
        item_sizes=(500, 4000),
        user_sizes=(300, 3000),
        measure_items=(500,),
        measure_users=(300,),
        n_items_users_axis=500,
        dim=32,
        n_queries=5,
        als_iterations=1,
        dn_steps=1,
        shape=DEFAULT_SHAPE,
        progress=lambda m: None,
    )
    result["scale"]["conclusion"] = scale_conclusion(result["scale"])
    result["summary"] = summary(result)
    written = write_report(result, tmp_path)

    assert {p.name for p in written} == {
        "bench.json",
        "bench.md",
        "search_latency.png",
        "scale_items.png",
        "scale_users.png",
    }
    assert all(p.stat().st_size > 0 for p in written)
    data = json.loads((tmp_path / "bench.json").read_text())
    s = data["search"]
    assert s["source"].startswith("synthetic") and s["items"] == 1500 and s["dim"] == 32
    exact = {n: r for n, r in s["recall"].items() if n.startswith("qdrant exact")}
    assert len(exact) == 4 and set(exact.values()) == {1.0} and s["targets"]["recall_met"] is True
    qdrant = {n: r for n, r in s["recall"].items() if n.startswith("qdrant")}
    assert len(qdrant) == 8 and all(0.5 <= r <= 1.0 for r in qdrant.values())
    mode = s["served_mode"]
    # the peers and the ranker's in-memory search are exact: the same ids as numpy
    peers = {n: r for n, r in s["recall"].items() if not n.startswith("qdrant")}
    assert len(peers) == 11 and set(peers.values()) == {1.0}, peers  # float32 beside the served precision
    assert s["search_precision"] in ("float32", "int8")
    # exact searches are served in memory: those cases are the served ones
    served_filtered = s["peers"]["filtered"]["served_case"]
    assert served_filtered == "ranker in-memory filtered top-11"
    assert s["peers"]["unfiltered"]["served_case"] == "ranker in-memory top-11" and mode == "exact"
    assert s["targets"]["served_recall"] == 1.0
    for side in ("unfiltered", "filtered"):
        assert all(v > 0 for k, v in s["peers"][side].items() if k != "served_case")
    assert s["peers"]["filtered"]["vs_numpy_matching_rows"] == pytest.approx(
        s["cases"][served_filtered]["p50_ms"] / s["cases"]["numpy matching rows top-11"]["p50_ms"]
    )
    sc = data["scale"]
    (idx,) = sc["measured"]["index"]
    assert idx["n_items"] == 500 and idx["recall_vs_numpy"] == 1.0 and idx["disk_mib"] > 0
    (als,) = sc["measured"]["als"]
    assert als["n_users"] == 300 and als["nnz"] > 300 and len(als["iteration_times_s"]) == 1
    flags = {p["size"]: p["extrapolated"] for p in sc["items"]["qdrant_p99_ms"]["points"]}
    assert flags == {500: False, 4000: True}
    assert {p["size"]: p["extrapolated"] for p in sc["users"]["als_iteration_s"]["points"]} == {300: False, 3000: True}
    md = (tmp_path / "bench.md").read_text()
    assert md == markdown(data)
    for heading in ("## Summary", "## Ranker search", "## Scale curves", "### Where one machine stops"):
        assert heading in md
    assert "*4k*" in md  # extrapolated rows are set in italics


def test_search_batches_reads_the_ranker_metric_over_http():
    from types import SimpleNamespace

    from anime2vec.serving.metrics import create_metrics, start_metrics_server
    from bench.gateway import search_batches

    m = create_metrics()
    for size in (1, 4, 4):
        m.search_batch_size.observe(size)
    http = start_metrics_server(m.registry, "127.0.0.1", 0)
    try:
        spec = SimpleNamespace(host="127.0.0.1", metrics_port=http.port)
        first = search_batches(spec)
        m.search_batch_size.observe(8)
        assert first == {"calls": 3.0, "searches": 9.0, "mean": 3.0}
        assert search_batches(spec, since=first) == {"calls": 1.0, "searches": 8.0, "mean": 8.0}
    finally:
        http.close()


def test_encoder_service_load_drives_the_service_over_a_socket():
    """The GPU bench's service line, here on a CPU with the tiny random model: the service is started as
    a process, every text goes through Encode, and its vectors are the in-process encoder's."""
    from anime2vec.features.encoder import TextEncoder
    from bench.encoder import encoder_service_load

    texts = [f"anime number {i}: a story about {'mecha ' * (i % 7)}pirates" for i in range(120)]
    expected = TextEncoder.tiny_random(precision="auto").encode(texts)
    r = encoder_service_load(
        texts,
        expected,
        device="cpu",
        encode_batch_size=16,
        max_batch_texts=64,
        request_texts=8,
        clients=4,
        model="tiny-random",
        progress=lambda m: None,
    )
    assert r["info"]["device"] == "cpu" and r["info"]["max_batch_texts"] == 64
    assert r["info"]["model_name"].startswith("tiny-random-bert")
    assert r["min_cosine_vs_in_process"] > 0.999 and r["texts_per_s"] > 0 and r["exit_code"] == 0


def test_recorded_gpu_run_renders_in_the_report():
    """reports/bench keeps the GPU figures measured on a lent machine; the summary and the section are
    rendered from them, with the target read from the recorded numbers."""
    from anime2vec.paths import REPO_ROOT
    from bench.report import _md_encoder_cuda

    c = json.loads((REPO_ROOT / "reports" / "bench" / "bench.json").read_text())["encoder_cuda"]
    (row,) = [r for r in summary({"encoder_cuda": c}) if "CUDA" in r["figure"]]
    assert row["met"] == (c["encoder_texts_per_s"] >= 5000) and c["cuda"] in row["figure"]
    section = "\n".join(_md_encoder_cuda(c))
    assert section.startswith("## Encoder on CUDA") and f"{c['encoder_texts_per_s']:,.0f} texts/s" in section
    assert all(f"batch {b}" in section for b in c["texts_per_s"]["encoder"])


def test_the_request_cpu_and_its_floor_are_measured_side_by_side():
    """Every kind runs once per round, in a rotating order, with a floor pass right after each plain
    request; the medians are of the calling thread's CPU, so a kind that burns more reads more."""
    order: list[str] = []

    def call(request):
        kind, n = request
        order.append(kind)
        sum(range(n))  # CPU on this thread

    kinds = {"plain": [("plain", 20_000)], "explain": [("explain", 400_000)], "filtered": [("filtered", 1)]}
    words = np.arange(1 << 16, dtype=np.uint64)
    ms, floor = interleaved_cpu_ms(kinds, call, words, 9)
    assert set(ms) == {"plain", "explain", "filtered"} and floor > 0
    assert ms["explain"] > ms["plain"] > ms["filtered"] > 0
    rounds = [order[i : i + 3] for i in range(0, 27, 3)]
    assert all(sorted(r) == ["explain", "filtered", "plain"] for r in rounds)
    assert len({tuple(r) for r in rounds}) == 3  # the order rotates: no kind always runs first


def test_search_cases_follow_each_other_in_a_shuffled_order():
    """Each query runs every case once, and no case always comes after the same one: what a case
    leaves in the caches must fall on all the others alike (a rotation kept each one's predecessor)."""
    from bench.search import _interleaved

    order: list[str] = []
    names = [f"case {i}" for i in range(6)]
    runs = {n: (lambda q, n=n: order.append(n) or [n, float(q[0])]) for n in names}
    times, found = _interleaved(runs, np.arange(60, dtype=np.float64)[:, None])
    assert all(len(times[n]) == 60 and found[n] == [[n, float(i)] for i in range(60)] for n in names)
    rounds = [order[i : i + 6] for i in range(0, 360, 6)]
    assert all(sorted(r) == names for r in rounds)
    before = {n: {a for a, b in zip(order, order[1:]) if b == n} for n in names}
    assert all(len(before[n]) >= 4 for n in names)  # each follows most of the others


def test_process_cpu_reads_what_a_process_burned():
    """The ranker-processes step reads the rankers' CPU from /proc: a child burns 0.5 s of CPU between
    two readings, and the difference is that (not the wall time around it)."""
    import subprocess
    import sys

    from bench.processes import _process_cpu_s

    burn = (
        "import sys, time\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.5: pass\n"
        "print('done', flush=True); sys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        before = _process_cpu_s([child.pid])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        burned = _process_cpu_s([child.pid]) - before
    finally:
        child.communicate("\n", timeout=30)
    assert 0.45 <= burned <= 0.9, burned


def test_core_plans_pin_rankers_apart_from_the_load_generator():
    """Which CPU each ranker gets: physical cores of their own while they last (then SMT siblings,
    flagged), the load generator at least one core per two rankers, the same at every count; too
    few cores or no affinity: 1 vs 2 unpinned."""
    from bench.processes import default_counts, plan_cores

    flat16 = [[c] for c in range(16)]
    p = plan_cores(list(range(16)), flat16, [1, 2, 4, 8])
    assert p.pinned and p.counts == [1, 2, 4, 8] and p.ranker_cpus == list(range(8, 16))
    assert p.client_cpus == list(range(8)) and p.own_physical_up_to is None and p.dropped == []
    assert default_counts(16) == [1, 2, 4, 8] and plan_cores(list(range(16)), flat16, None).counts == [1, 2, 4, 8]
    smt = [[c, c + 8] for c in range(8)]  # 8 physical cores, two threads each
    p = plan_cores(sorted(range(16)), smt, [1, 2, 4, 8])
    assert p.pinned and p.counts == [1, 2, 4, 8] and p.own_physical_up_to == 4
    assert p.ranker_cpus == [4, 5, 6, 7, 12, 13, 14, 15] and sorted(p.client_cpus) == [0, 1, 2, 3, 8, 9, 10, 11]
    p = plan_cores([0, 1, 2], None, [1, 2, 4, 8])  # 3 cores: 1 vs 2 pinned, the load generator on the third
    assert p.pinned and p.counts == [1, 2] and p.dropped == [4, 8] and p.ranker_cpus == [1, 2] and p.client_cpus == [0]
    for unpinned in (plan_cores([0, 1], None, None), plan_cores(None, None, [1, 2, 4])):
        assert not unpinned.pinned and unpinned.counts == [1, 2]
        assert "cores shared with the load generator" in unpinned.note


@pytest.fixture(scope="module")
def sample_bundle(tmp_path_factory):
    from tests.sample_bundles import fast_config, train_fast_bundle

    root = tmp_path_factory.mktemp("procs")
    return train_fast_bundle(fast_config(root / "models", root / "cache"))


@pytest.mark.timeout(300)
def test_ranker_processes_measure_one_against_two(sample_bundle):
    """Real ranker processes on the sample bundle, pinned where the OS can pin (here each ranker on the
    last CPU and the load generator on the first: this machine may have only two), with no encoder
    running; the result has the figures bench/report.py and the summary read."""
    import os

    from bench.__main__ import summary
    from bench.processes import CorePlan, run_processes_bench, usable_cpus
    from bench.report import markdown

    cpus = usable_cpus()
    plan = (
        CorePlan(pinned=True, counts=[1, 2], ranker_cpus=[cpus[-1]] * 2, client_cpus=[cpus[0]], note="test")
        if cpus
        else None
    )
    r = run_processes_bench(
        sample_bundle,
        per_process_concurrency=(2,),
        step_s=0.6,
        warmup_s=0.2,
        progress=lambda m: None,
        plan=plan,
    )
    assert r["counts"] == [1, 2] and [s["processes"] for s in r["steps"]] == [1, 2]
    for s in r["steps"]:
        assert s["errors"] == {} and s["requests"] > 0 and s["concurrency"] == 2 * s["processes"]
        assert s["ranker_cpu_ms_per_request"] > 0 and len(s["ranker_cores_each"]) == s["processes"]
    assert r["ratio"] == pytest.approx(r["best_rps"]["2"] / r["best_rps"]["1"]) and r["ideal"] == 2.0
    assert r["ideal_linear"] == {"1": 1.0, "2": 2.0} and r["bundle"]["items"] > 0 and r["bundle"]["vector_dim"] > 0
    if cpus:
        assert r["pinned"] and r["pinning"]["rankers"] == {"ranker": [cpus[-1]], "ranker-1": [cpus[-1]]}
        assert r["pinning"]["load_generator"] == [cpus[0]] and r["steps"][1]["load_generator_cpus"] == [[cpus[0]]]
        assert sorted(os.sched_getaffinity(0)) == cpus  # this process's own affinity is given back
    result = {"machine": {"summary": "test", "cpu_count": 2, "cuda": None}, "started": "now", "processes": r}
    (row,) = [x for x in summary(result) if x["figure"].startswith("ranker throughput")]
    assert row["met"] == r["targets"]["two_processes_met"]
    assert "## Ranker processes" in markdown(result | {"summary": summary(result)})

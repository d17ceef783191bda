"""Gateway end to end: the favourites query (GatewayService.Recommend with favourite ids and an API
key) through encoder + ranker + gateway running as processes on loopback, against the Python gRPC
ceiling measured in the same run (bench/echo.py: same grpcio, same thread pool, no work).

One load-generator process (bench/loadgen.py, grpc.aio) drives, at each concurrency step, the echo
server, a relay in front of it (the same two Python gRPC hops as gateway → ranker, with no work),
the ranker directly (RecommendFromFavourites: what the gateway calls) and the gateway, one after
another, so all four see the same machine load. Then an open loop at half of the gateway's
best throughput gives the latency a caller sees below saturation. Then, with the services
stopped, 1 vs 2 ranker processes (bench/processes.py; skipped when the bench's `processes` part
runs, which measures the same more widely). Last, the ranker's request path is profiled in-process
(cProfile) to say where the time goes.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import ServiceProcess, free_ports, standard_specs
from bench.echo import METHOD as ECHO_METHOD
from bench.loadgen import Step, run_plan
from bench.processes import (
    RANKER_METHOD,
    TARGET_TWO_PROCESSES,
    favourites_requests,
    find_bundle,
    run_processes_bench,
)
from services.ranker.settings import RankerSettings

API_KEY = "bench-key"
GATEWAY_METHOD = "/anime2vec.v1.GatewayService/Recommend"
CONCURRENCY = (1, 2, 4, 8, 16, 32)
PROCESS_COUNTS = (1, 2)  # ranker processes compared here (bench/processes.py: more where the cores allow)
# the ranker's CPU per favourites request against one pass over the int8 vectors (issue 16); the
# gateway / echo ratio is reported as context only: it mostly measures Python gRPC on shared cores
TARGET_CPU_TO_FLOOR, TARGET_P99_MS = 2.5, 20.0
STARTUP_TIMEOUT_S = 600


class EchoProcess:
    """bench/echo.py as a process: an echo server, or with `forward` a relay to one."""

    def __init__(self, reply_bytes: int, log: Path, forward: str | None = None):
        self.log = log
        args = ["--port", "0", "--reply-bytes", str(reply_bytes)] + (["--forward", forward] if forward else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=open(log, "ab"),
            text=True,
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        )
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"echo server did not start: {line!r}; see {log}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Context:
    """Stands in for grpc.ServicerContext when a handler is called in-process for profiling."""

    def time_remaining(self):
        return None

    def is_active(self):
        return True

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "in-process"


def int8_read_floor_ms(vectors: np.ndarray, passes: int = 50) -> float:
    """CPU ms of one pass over the int8 copy of the item vectors, passes back to back: the 8.6 MB
    copy stays in the L3 cache, so this reads 2-6x lower than between requests
    (`interleaved_cpu_ms`, the figure the target uses) or in bench/search.py; reported beside it."""
    from bench.search import int8_words

    words = int8_words(vectors)
    words.sum()
    total = 0.0
    for _ in range(passes):
        start = time.thread_time()
        words.sum()
        total += time.thread_time() - start
    return total / passes * 1e3


def interleaved_cpu_ms(kinds: dict[str, list], call, words: np.ndarray, calls: int) -> tuple[dict[str, float], float]:
    """Median CPU ms (this thread's: the in-process handler runs on the calling thread) of one call
    of each kind and of one pass over the int8 words, measured side by side: each round runs every
    kind once, in a rotating order, and a floor pass after each plain request, so the floor finds
    the caches as a request's search finds them and a neighbour's load or a stall falls on all
    alike (medians: the rounds a stall hits do not move them)."""
    names = list(kinds)
    times: dict[str, list[float]] = {n: [] for n in [*names, "floor"]}
    for i in range(calls):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            batch = kinds[n]
            start = time.thread_time()
            call(batch[i % len(batch)])
            times[n].append(time.thread_time() - start)
            if n == "plain":
                start = time.thread_time()
                words.sum()
                times["floor"].append(time.thread_time() - start)
    ms = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
    return {n: ms[n] for n in names}, ms["floor"]


def profile_ranker(bundle: Path, ranker_dir: Path, favourites: list[list[int]], calls: int) -> dict:
    """RecommendFromFavourites called in-process (no gRPC): its own time, its CPU time per request
    (plain, with explanations, with a selective filter) against the int8 read floor, and cProfile's
    top costs."""
    from anime2vec.v1 import common_pb2, ranker_pb2
    from services.ranker.server import one_thread_per_request, start
    from services.ranker.settings import RankerSettings

    settings = RankerSettings.from_env(
        model_store=bundle.parent,
        bundle=bundle.name,
        data_dir=ranker_dir,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        alias_poll_s=0,
    )
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = torch.get_num_threads()
    pools = {p["prefix"]: p["num_threads"] for p in threadpool_info()}
    one_thread_per_request()  # as services/ranker/server.py main() runs it
    running, servicer = start(settings)
    try:
        requests = [ranker_pb2.RecommendFromFavouritesRequest(liked_ids=f) for f in favourites]
        kinds = {
            "plain": requests,
            "explain": [
                ranker_pb2.RecommendFromFavouritesRequest(
                    liked_ids=f, options=common_pb2.RecommendOptions(explain=True)
                )
                for f in favourites
            ],
            # bench/search.py's filter: answered in memory (services/ranker/memory_scan.py)
            "filtered": [
                ranker_pb2.RecommendFromFavouritesRequest(
                    liked_ids=f,
                    options=common_pb2.RecommendOptions(
                        filters=common_pb2.Filters(include_genres=["Mecha", "Horror"], year_min=2000, year_max=2015)
                    ),
                )
                for f in favourites
            ],
        }
        ctx = _Context()
        for batch in kinds.values():
            for r in batch[:5]:
                servicer.RecommendFromFavourites(r, ctx)
        vectors = servicer.lifecycle.current().model.item_tower
        from bench.search import int8_words

        # the floor as a request's search meets it (a request between passes), and back to back
        cpu_ms, floor_ms = interleaved_cpu_ms(
            kinds, lambda r: servicer.RecommendFromFavourites(r, ctx), int8_words(vectors), calls
        )
        floor_back_to_back_ms = int8_read_floor_ms(vectors)
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            servicer.RecommendFromFavourites(requests[i % len(requests)], ctx)
            times.append(time.perf_counter() - t0)
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(calls):
            servicer.RecommendFromFavourites(requests[i % len(requests)], ctx)
        profiler.disable()
    finally:
        running.stop()
        torch.set_num_threads(threads)
        threadpool_limits(pools)  # as they were: keyed by library prefix
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({func})",
                "calls_per_request": ncalls / calls,
                "self_ms_per_request": tottime / calls * 1e3,
                "cum_ms_per_request": cumtime / calls * 1e3,
                "self_share": tottime / total if total else 0.0,
            }
        )
    rows.sort(key=lambda r: -r["self_ms_per_request"])
    t = np.asarray(times) * 1e3
    return {
        "calls": calls,
        "cpu_ms_per_request": cpu_ms,
        "int8_read_floor_ms": floor_ms,
        "int8_read_floor_back_to_back_ms": floor_back_to_back_ms,
        "cpu_to_floor": {kind: ms / floor_ms for kind, ms in cpu_ms.items()},
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "top_self": rows[:45],
        # the whole in-memory search (MemoryScan.scan and what it calls), under the profiler
        "memory_search_ms_per_request": next(
            (
                r["cum_ms_per_request"]
                for r in rows
                if r["function"].startswith("memory_scan.py") and "(scan)" in r["function"]
            ),
            None,
        ),
        "profiled_ms_per_request": total / calls * 1e3,
        "top_cumulative": sorted(rows, key=lambda r: -r["cum_ms_per_request"])[:60],
    }


def search_batches(spec, since: dict | None = None) -> dict:
    """The ranker's a2v_search_batch_size counters from its /metrics: engine calls, searches in
    them and their mean (searches per call), minus `since`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{spec.host}:{spec.metrics_port}/metrics", timeout=10).read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "a2v_search_batch_size"
        for sample in family.samples
    }
    calls = values.get("a2v_search_batch_size_count", 0.0) - (since or {}).get("calls", 0.0)
    searches = values.get("a2v_search_batch_size_sum", 0.0) - (since or {}).get("searches", 0.0)
    return {"calls": calls, "searches": searches, "mean": searches / calls if calls else None}


def _best(steps: list[dict]) -> dict:
    return max(steps, key=lambda s: s["throughput_rps"])


def run_gateway_bench(
    concurrency: tuple[int, ...] = CONCURRENCY,
    step_s: float = 4.0,
    warmup_s: float = 1.0,
    open_loop_s: float = 6.0,
    profile_calls: int = 200,
    ranker_processes: bool = True,
    progress=print,
) -> dict:
    import grpc

    from anime2vec.v1 import gateway_pb2_grpc, ranker_pb2

    with tempfile.TemporaryDirectory(prefix="a2v-bench-gw-") as tmp:
        work = Path(tmp)
        bundle, bundle_kind = find_bundle(work, progress)
        manifest = json.loads((bundle / "manifest.json").read_text())
        favourites = favourites_requests(bundle)
        gw_payloads = [_gateway_request(f).SerializeToString() for f in favourites]
        rk_payloads = [ranker_pb2.RecommendFromFavouritesRequest(liked_ids=f).SerializeToString() for f in favourites]
        ports = free_ports(6)
        specs = standard_specs(
            "127.0.0.1",
            {"encoder": tuple(ports[0:2]), "ranker": tuple(ports[2:4]), "gateway": tuple(ports[4:6])},
            encoder_model="minilm",
            model_store=bundle.parent,
            bundle=bundle.name,
            ranker_data_dir=work / "ranker",
            gateway_env={"API_KEYS": API_KEY},
        )
        procs = {s.name: ServiceProcess(s, work / "logs" / f"{s.name}.log") for s in specs}
        echo = relay = None
        started = time.perf_counter()
        try:
            progress(f"starting encoder, ranker, gateway on loopback (bundle {bundle.name}, {bundle_kind})")
            for name in ("encoder", "ranker"):
                procs[name].start()
            for name in ("encoder", "ranker"):
                procs[name].wait_serving(STARTUP_TIMEOUT_S)
            procs["gateway"].start()
            procs["gateway"].wait_serving(STARTUP_TIMEOUT_S)
            startup_s = time.perf_counter() - started
            metadata = (("authorization", f"Bearer {API_KEY}"),)
            with grpc.insecure_channel(procs["gateway"].spec.address) as ch:
                reply = gateway_pb2_grpc.GatewayServiceStub(ch).Recommend(
                    _gateway_request(favourites[0]), metadata=metadata, timeout=30
                )
            reply_bytes = reply.ByteSize()
            echo = EchoProcess(reply_bytes, work / "logs" / "echo.log")
            relay = EchoProcess(0, work / "logs" / "relay.log", forward=echo.address)
            targets = {
                "echo": (echo.address, ECHO_METHOD, gw_payloads, ()),
                "relay": (relay.address, ECHO_METHOD, gw_payloads, ()),
                "ranker": (procs["ranker"].spec.address, RANKER_METHOD, rk_payloads, ()),
                "gateway": (procs["gateway"].spec.address, GATEWAY_METHOD, gw_payloads, metadata),
            }
            plan = [
                Step(name, addr, method, payloads, md, concurrency=c, duration_s=step_s, warmup_s=warmup_s)
                for c in concurrency
                for name, (addr, method, payloads, md) in targets.items()
            ]
            progress(
                f"closed loop: {len(concurrency)} concurrency steps × {len(targets)} targets × "
                f"{warmup_s + step_s:.0f} s (services up in {startup_s:.0f} s)"
            )
            batches_before = search_batches(procs["ranker"].spec)
            sweep = run_plan(plan)
            batches = search_batches(procs["ranker"].spec, since=batches_before)
            by = {name: [s for s in sweep if s["name"] == name] for name in targets}
            best = {name: _best(steps) for name, steps in by.items()}
            half = best["gateway"]["throughput_rps"] / 2
            progress(f"open loop at {half:.0f} req/s (half the gateway's best) on gateway and echo")
            open_plan = [
                Step(
                    name,
                    *targets[name][:2],
                    targets[name][2],
                    targets[name][3],
                    rate_rps=half,
                    duration_s=open_loop_s,
                    warmup_s=warmup_s,
                )
                for name in ("gateway", "echo")
            ]
            open_loop = {r["name"]: r for r in run_plan(open_plan)}
            errors = {name: sum(sum(s["errors"].values()) for s in steps) for name, steps in by.items()}
        finally:
            for baseline in (relay, echo):
                if baseline is not None:
                    baseline.stop()
            for name in ("gateway", "ranker", "encoder"):
                procs[name].stop()
        processes: dict | None = None
        if ranker_processes:
            try:
                processes = run_processes_bench(
                    bundle,
                    PROCESS_COUNTS,
                    step_s=step_s,
                    warmup_s=warmup_s,
                    payloads=rk_payloads,
                    bundle_kind=bundle_kind,
                    progress=progress,
                )
            except Exception as e:  # a measurement that failed is reported, the others are kept
                processes = {"error": f"{type(e).__name__}: {e}"}
        profile: dict
        try:
            progress(f"profiling the ranker's favourites path in-process ({profile_calls} calls, cProfile)")
            profile = profile_ranker(bundle, work / "ranker", favourites, profile_calls)
        except Exception as e:  # the profile explains a miss; its failure must not lose the measurements
            profile = {"error": f"{type(e).__name__}: {e}"}

    ratio = best["gateway"]["throughput_rps"] / best["echo"]["throughput_rps"]
    p99_half = open_loop["gateway"].get("p99_ms", float("nan"))
    c1 = {name: steps[0] for name, steps in by.items()}
    return {
        "bundle": {
            "version": bundle.name,
            "kind": bundle_kind,
            "items": manifest.get("dims", {}).get("n_items"),
            "vector_dim": manifest.get("dims", {}).get("tower_dim"),
            # the ranker's default search mode scans the int8 copies: one byte per coordinate
            "search_mode": RankerSettings.model_fields["search_mode"].default,
            "bytes_scanned_per_query": (manifest.get("dims", {}).get("n_items") or 0)
            * (manifest.get("dims", {}).get("tower_dim") or 0),
        },
        "request": {
            "favourites_per_request": len(favourites[0]),
            "distinct_requests": len(favourites),
            "limit": "default (10)",
            "reply_bytes": reply_bytes,
        },
        "client": "one separate process, grpc.aio, one channel per step, raw bytes (no protobuf work); "
        "closed loop = N callers each waiting for its answer; open loop = fixed arrival rate, "
        "latency from the scheduled start",
        "server_settings": "services and echo: grpcio thread pool of 8 workers, 64 concurrent RPCs (defaults)",
        "startup_s": startup_s,
        "step_s": step_s,
        "warmup_s": warmup_s,
        "sweep": by,
        "best": {
            k: {
                "throughput_rps": v["throughput_rps"],
                "concurrency": v["concurrency"],
                "p50_ms": v.get("p50_ms"),
                "p99_ms": v.get("p99_ms"),
            }
            for k, v in best.items()
        },
        "errors": errors,
        # engine calls and searches in them during the closed-loop sweep (ranker + gateway steps)
        "search_batches": batches,
        "ratio_gateway_to_echo": ratio,
        "ratio_ranker_to_echo": best["ranker"]["throughput_rps"] / best["echo"]["throughput_rps"],
        "ratio_relay_to_echo": best["relay"]["throughput_rps"] / best["echo"]["throughput_rps"],
        "ratio_gateway_to_relay": best["gateway"]["throughput_rps"] / best["relay"]["throughput_rps"],
        "open_loop_half_max": open_loop,
        "latency_c1_ms": {name: s.get("p50_ms") for name, s in c1.items()},
        "profile_ranker_in_process": profile,
        **({"ranker_processes": processes} if processes is not None else {}),
        "targets": {
            **(
                {
                    "two_processes": TARGET_TWO_PROCESSES,
                    "two_processes_met": (processes.get("targets") or {}).get("two_processes_met"),
                }
                if processes is not None
                else {}
            ),
            "cpu_to_floor": TARGET_CPU_TO_FLOOR,
            "cpu_to_floor_met": bool(profile.get("cpu_to_floor", {}).get("plain", np.inf) <= TARGET_CPU_TO_FLOOR),
            "p99_ms_at_half_max": TARGET_P99_MS,
            "p99_met": bool(p99_half <= TARGET_P99_MS),
        },
    }


def _gateway_request(ids: list[int]):
    from anime2vec.v1 import common_pb2, gateway_pb2

    return gateway_pb2.RecommendRequest(favourites=[common_pb2.AnimeRef(anime_id=a) for a in ids])

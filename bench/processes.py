"""Ranker throughput as ranker processes are added (issue 16: two processes on two cores ≥ 1.7× one).

Only ranker processes run: RecommendFromFavourites needs neither the encoder nor the gateway (the
rankers are given an encoder address nobody listens on, which they dial only for AddAnime). They
serve one bundle wired as `make run` wires them (anime2vec/runlocal.py standard_specs): the first
with its own data dir, each other one with its own copy of the embedded collection and the first
one's stores of record. The load generator (bench/loadgen.py) calls them through one round-robin
channel per load-generator process, as the gateway does.

Pinned (Linux, enough cores): each ranker process on a core of its own (one logical CPU of a
physical core of its own while there are enough; the SMT siblings of the rankers' cores stay idle),
the load-generator processes and this process on the cores left, the same cores at every count, so
adding a ranker adds a core and nothing else. The rankers run as served: services/ranker/server.py
main() puts torch and BLAS on one thread each (`one_thread_per_request`), the gRPC pool keeps its
default 8 workers, and every A2V_RANKER_* setting keeps its default (ServiceSpec.environment drops
this environment's). Each count is driven at a few requests in flight per ranker process (4, 8, 16
× the count), the counts alternating at each level; its best throughput is compared with one
process's and with ideal linear scaling, beside the rankers' CPU per request and cores busy, read
from /proc over the counted window.

With too few cores to give the load generator cores of its own (fewer than 3, like the 2-core
development machine), or without sched_setaffinity, it measures 1 vs 2 processes unpinned, the
cores shared with the load generator, and the result says so.

`python -m bench.processes [--bundle DIR] [--counts 1,2,4,8] [--out FILE]`: the measurement alone
(only the ranker's dependencies and numpy: no plotting); `python -m bench --only processes` runs it
as a part of the bench report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anime2vec.bundle import newest_bundle
from anime2vec.paths import REPO_ROOT, default_model_store
from anime2vec.process_groups import raise_on_signals, stopping
from anime2vec.runlocal import OFFLINE_ENV, ServiceProcess, free_ports, ranker_labels, standard_specs
from bench.loadgen import Step, run_plan

RANKER_METHOD = "/anime2vec.v1.RankerService/RecommendFromFavourites"
PER_PROCESS_CONCURRENCY = (4, 8, 16)  # requests in flight per ranker process
TARGET_TWO_PROCESSES = 1.7  # two ranker processes' best throughput / one's
STARTUP_TIMEOUT_S = 600
START_MARGIN_S = 2.0  # the load-generator processes of a step start together this long after launch
CLIENT_SATURATED = 0.9  # a load-generator process this busy (CPU / wall) may be what limits a step


# ---- the bundle and the requests (shared with bench/gateway.py) ---------------------------------


def find_bundle(work: Path, progress) -> tuple[Path, str]:
    """The newest full-data bundle in the model store, else a sample one, else one trained here on
    the sample (a few minutes); returns (bundle dir, what it is)."""
    store = default_model_store()
    if (b := newest_bundle(store, "full")) is not None:
        return b, "full data (models/)"
    if (store / "sample").is_dir() and (b := newest_bundle(store / "sample", "sample")) is not None:
        return b, "sample data (models/sample/)"
    progress("no bundle in the model store: training one on the sample data (a few minutes)")
    cmd = [
        sys.executable,
        "-m",
        "anime2vec.cli",
        "train",
        "--sample",
        "--epochs",
        "8",
        "--quiet",
        "--store",
        str(work / "models"),
        "--report-dir",
        str(work / "train-report"),
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ | OFFLINE_ENV, check=True, capture_output=True)
    b = newest_bundle(work / "models", "sample")
    if b is None:
        raise RuntimeError("training a sample bundle for the bench produced none")
    return b, "sample data (trained for this run)"


def favourites_requests(bundle: Path, n: int = 64, k: int = 3, seed: int = 0) -> list[list[int]]:
    """n favourites lists, each of k distinct popular anime ids (drawn from the top 500 by members)."""
    with open(bundle / "catalog.jsonl", encoding="utf-8") as f:  # lines end at "\n" only (titles hold U+2028)
        rows = [json.loads(line) for line in f if line.strip()]
    popular = [r["anime_id"] for r in sorted(rows, key=lambda r: -(r.get("members") or 0))[:500]]
    rng = np.random.default_rng(seed)
    return [[int(a) for a in rng.choice(popular, size=k, replace=False)] for _ in range(n)]


def bundle_facts(bundle: Path, kind: str) -> dict:
    dims = json.loads((bundle / "manifest.json").read_text()).get("dims", {})
    return {
        "version": bundle.name,
        "kind": kind,
        "items": dims.get("n_items"),
        "vector_dim": dims.get("tower_dim"),
    }


# ---- cores ---------------------------------------------------------------------------------------


def usable_cpus() -> list[int] | None:
    """The logical CPUs this process may run on; None where the OS cannot pin (no sched_getaffinity)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def physical_cores(cpus: Sequence[int]) -> list[list[int]]:
    """`cpus` grouped by physical core (SMT siblings together, from /sys), ordered by their first CPU;
    each CPU its own core where the topology cannot be read."""
    groups: dict[str, list[int]] = {}
    for c in cpus:
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = f"cpu{c}"
        groups.setdefault(key, []).append(c)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def default_counts(n_cores: int) -> list[int]:
    """1, 2, 4, ... while the rankers' cores leave the load generator one core per two rankers."""
    counts, n = [], 1
    while n + math.ceil(n / 2) <= n_cores:
        counts.append(n)
        n *= 2
    return counts


@dataclass
class CorePlan:
    pinned: bool
    counts: list[int]
    ranker_cpus: list[int] = field(default_factory=list)  # pinned: ranker i on ranker_cpus[i]
    client_cpus: list[int] = field(default_factory=list)  # pinned: the load generator and this process
    # pinned counts above this share physical cores (two rankers on SMT siblings); None: none do
    own_physical_up_to: int | None = None
    dropped: list[int] = field(default_factory=list)  # counts asked for that do not fit
    note: str = ""


def plan_cores(cpus: Sequence[int] | None, cores: list[list[int]] | None, counts: Sequence[int] | None) -> CorePlan:
    """Which logical CPU each ranker gets and which the load generator gets. The rankers take one
    CPU on each of the last physical cores, the load generator every CPU of the first ones: at least
    one physical core per two rankers of the largest count, the same at every count. Counts that do
    not fit on physical cores of their own use the rankers' SMT siblings (flagged); counts that do
    not fit at all are dropped. Fewer than two counts left: 1 vs 2 unpinned."""
    asked = sorted({1, 2, *counts}) if counts else None  # 1: the reference; 2: issue 16's figure

    def unpinned(why: str) -> CorePlan:
        return CorePlan(
            pinned=False,
            counts=[1, 2],
            dropped=[n for n in (asked or []) if n > 2],
            note=f"unpinned: {why}; 1 vs 2 processes with the cores shared with the load generator",
        )

    if cpus is None:
        return unpinned("this OS cannot pin processes to cores (no sched_setaffinity)")
    cores = cores or [[c] for c in cpus]
    wanted = list(asked or default_counts(len(cores)))
    dropped: list[int] = []
    while len(wanted) >= 2:
        m = wanted[-1]
        client = math.ceil(m / 2)  # physical cores left to the load generator
        own = len(cores) - client  # physical cores the rankers may have
        if m <= own:
            rankers, rest = cores[len(cores) - m :], cores[: len(cores) - m]
            return CorePlan(
                pinned=True,
                counts=wanted,
                ranker_cpus=[g[0] for g in rankers],
                client_cpus=[c for g in rest for c in g],
                own_physical_up_to=None,
                dropped=dropped,
                note=f"pinned: each ranker on a physical core of its own, the load generator on {len(rest)} others",
            )
        if own >= 1 and min(len(g) for g in cores) >= 2 and m <= 2 * own:
            rankers, rest = cores[client:], cores[:client]
            cpus_in_order = [g[0] for g in rankers] + [g[1] for g in rankers]
            return CorePlan(
                pinned=True,
                counts=wanted,
                ranker_cpus=cpus_in_order[:m],
                client_cpus=[c for g in rest for c in g],
                own_physical_up_to=own,
                dropped=dropped,
                note=f"pinned: up to {own} rankers each on a physical core of its own, more on the SMT siblings of "
                f"those cores (flagged per count); the load generator on {len(rest)} other physical cores",
            )
        dropped.insert(0, wanted.pop())
    return unpinned(
        f"{len(cpus)} logical CPUs ({len(cores)} physical cores), too few to give two rankers a core each "
        f"and the load generator others"
    )


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Every thread of the process on `cpus` (the threads it starts later inherit the mask)."""
    for tid in _threads(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that has just ended
            pass


def affinity(pid: int) -> list[int]:
    """The CPUs any thread of the process may run on."""
    allowed: set[int] = set()
    for tid in _threads(pid):
        try:
            allowed |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            pass
    return sorted(allowed)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (all their threads so far), from /proc."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def machine_facts(cpus: Sequence[int] | None, cores: list[list[int]] | None) -> dict:
    model = cpu_model()
    try:
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().strip()  # "max 100000": no CPU-time quota
    except OSError:
        quota = None
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": list(cpus) if cpus is not None else None,
        "physical_cores": len(cores) if cores is not None else None,
        "smt": any(len(g) > 1 for g in cores or []),
        "cgroup_cpu_max": quota,
        "python": platform.python_version(),
        "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


# ---- the measurement -----------------------------------------------------------------------------


def run_processes_bench(
    bundle: Path | None = None,
    counts: Sequence[int] | None = None,
    per_process_concurrency: Sequence[int] = PER_PROCESS_CONCURRENCY,
    step_s: float = 4.0,
    warmup_s: float = 1.0,
    payloads: list[bytes] | None = None,
    bundle_kind: str = "given",
    progress: Callable[[str], None] = print,
    allow_pinning: bool = True,
    plan: CorePlan | None = None,
    logs_to: Path | None = None,
) -> dict:
    """Start the ranker processes of the largest count (pinned where the machine allows), drive
    1, 2, ... of them, and return the figures (see the module's docstring). `payloads`: serialized
    RecommendFromFavouritesRequest messages; default: 64 favourites lists of the bundle's popular
    anime. `allow_pinning=False`: the unpinned 1 vs 2 whatever the machine. `plan`: which CPU
    each ranker and the load generator get, instead of plan_cores' choice (tests). `logs_to`: the
    rankers' logs are copied there at the end, whatever happened (copy_logs)."""
    from anime2vec.v1 import ranker_pb2

    cpus = usable_cpus() if allow_pinning else None
    cores = physical_cores(cpus) if cpus is not None else None
    if plan is None:
        plan = plan_cores(cpus, cores, counts)
        if not allow_pinning:
            plan.note = "unpinned (asked for): 1 vs 2 processes with the cores shared with the load generator"
    machine = machine_facts(cpus, cores)
    progress(
        f"ranker processes: {plan.note}; counts {plan.counts}" + (f" (dropped {plan.dropped})" if plan.dropped else "")
    )
    with tempfile.TemporaryDirectory(prefix="a2v-bench-procs-") as tmp:
        work = Path(tmp)
        if bundle is None:
            bundle, bundle_kind = find_bundle(work, progress)
        if payloads is None:
            payloads = [
                ranker_pb2.RecommendFromFavouritesRequest(liked_ids=f).SerializeToString()
                for f in favourites_requests(bundle)
            ]
        n_max = max(plan.counts)
        labels = ranker_labels(n_max)
        ports = free_ports(2 + 2 * n_max)  # the first two: an encoder address nobody serves
        specs = standard_specs(
            "127.0.0.1",
            {"encoder": (ports[0], ports[1]), "gateway": (0, 0)}
            | {label: (ports[2 + 2 * i], ports[3 + 2 * i]) for i, label in enumerate(labels)},
            encoder_model="minilm",
            model_store=bundle.parent,
            bundle=bundle.name,
            ranker_data_dir=work / "ranker",
            gateway_env={},
        )
        rankers = [ServiceProcess(s, work / "logs" / f"{s.label}.log") for s in specs if s.name == "ranker"]
        own_cpus = os.sched_getaffinity(0) if plan.pinned else None
        started = time.perf_counter()
        try:
            if plan.pinned:
                os.sched_setaffinity(0, plan.client_cpus)  # this thread, and the threads and children it starts
            # the first alone (it creates the stores of record the others share), then the others together
            for group in ([0], range(1, len(rankers))):
                for i in group:
                    rankers[i].start()
                    if plan.pinned:  # at once: the child is still starting Python, its only thread
                        proc = rankers[i].proc
                        assert proc is not None
                        pin(proc.pid, [plan.ranker_cpus[i]])
                for i in group:
                    rankers[i].wait_serving(STARTUP_TIMEOUT_S)
            startup_s = time.perf_counter() - started
            pinning = None
            if plan.pinned:
                pinning = _check_pinning(rankers, plan)
            progress(
                f"{n_max} ranker process(es) serving {bundle.name} in {startup_s:.0f} s; "
                f"{len(per_process_concurrency)} levels × {len(plan.counts)} counts × {warmup_s + step_s:g} s"
            )
            steps = []
            for k in per_process_concurrency:
                for n in plan.counts:
                    step = _drive(rankers[:n], plan, k, payloads, step_s, warmup_s)
                    steps.append(step)
                    progress(
                        f"  {n} process(es) × {k} in flight each: {step['throughput_rps']:.0f} req/s, ranker CPU "
                        f"{_f(step.get('ranker_cpu_ms_per_request'))} ms/request, rankers {step['ranker_cores']:.2f} "
                        f"cores busy, load generator {step['client_cpu_share']:.2f}"
                    )
        finally:
            with stopping():  # a stop signal now does not cut the rankers' stop short
                for r in rankers:
                    r.terminate()
                for r in rankers:
                    r.stop()
            if own_cpus is not None:
                os.sched_setaffinity(0, own_cpus)
            if logs_to is not None:
                copy_logs(work / "logs", logs_to)
    return _summarise(plan, machine, pinning, steps, bundle_facts(bundle, bundle_kind), startup_s, step_s, warmup_s)


def copy_logs(src: Path, dst: Path) -> None:
    """The rankers' logs without their per-call lines for calls that succeeded (one per request: tens
    of MB at this load), which are counted instead."""
    dst.mkdir(parents=True, exist_ok=True)
    for log in sorted(src.glob("*.log")):
        ok_calls = 0
        with open(log, encoding="utf-8", errors="replace") as f, open(dst / log.name, "w", encoding="utf-8") as out:
            for line in f:
                if '"msg": "rpc"' in line and '"code": "OK"' in line:
                    ok_calls += 1
                else:
                    out.write(line)
            out.write(f"(bench.processes: {ok_calls} lines of successful calls left out)\n")


def _check_pinning(rankers: list[ServiceProcess], plan: CorePlan) -> dict:
    """Pin again (a thread started before the first pin would have escaped it) and check every
    thread of every ranker is on its core; the pinning as the result records it."""
    out = {}
    for i, r in enumerate(rankers):
        assert r.proc is not None
        pin(r.proc.pid, [plan.ranker_cpus[i]])
        if (got := affinity(r.proc.pid)) != [plan.ranker_cpus[i]]:
            raise RuntimeError(f"{r.spec.label} runs on CPUs {got}, not on CPU {plan.ranker_cpus[i]} alone")
        out[r.spec.label] = [plan.ranker_cpus[i]]
    return {
        "rankers": out,
        "load_generator": plan.client_cpus,
        "bench_process": plan.client_cpus,
        "verified": "every thread of every ranker on its CPU alone (sched_getaffinity per thread)",
    }


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


def _drive(
    rankers: list[ServiceProcess], plan: CorePlan, k: int, payloads: list[bytes], step_s: float, warmup_s: float
) -> dict:
    """One closed-loop step: k × n requests in flight over n rankers, split over load-generator
    processes (pinned: one per ranker, as many as the load generator's cores allow, each on its own
    share of them; unpinned: one), which start together and count the same window; the rankers' CPU
    is read from /proc at that window's start and end."""
    n = len(rankers)
    target = rankers[0].spec.address if n == 1 else "ipv4:" + ",".join(r.spec.address for r in rankers)
    options = () if n == 1 else (("grpc.lb_policy_name", "round_robin"),)
    groups: list[list[int] | None] = (
        [[int(c) for c in g] for g in np.array_split(plan.client_cpus, min(n, len(plan.client_cpus)))]
        if plan.pinned
        else [None]
    )
    start_at = time.time() + START_MARGIN_S
    steps = [
        Step(
            str(n),
            target,
            RANKER_METHOD,
            payloads,
            (),
            concurrency=c,
            duration_s=step_s,
            warmup_s=warmup_s,
            options=options,
            start_at=start_at,
            extra={"processes": n},
        )
        for c in _split(k * n, len(groups))
    ]
    pids = [r.proc.pid for r in rankers if r.proc is not None]
    with ThreadPoolExecutor(len(steps)) as pool:
        futures = [pool.submit(run_plan, [s], None, g) for s, g in zip(steps, groups)]
        _sleep_until(start_at + warmup_s)
        cpu0 = [_process_cpu_s([p]) for p in pids]
        _sleep_until(start_at + warmup_s + step_s)
        cpu1 = [_process_cpu_s([p]) for p in pids]
        parts = [f.result()[0] for f in futures]
    cpu = [b - a for a, b in zip(cpu0, cpu1)]
    rps = sum(p["throughput_rps"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for code, count in p["errors"].items():
            errors[code] = errors.get(code, 0) + count
    served = rps * step_s
    out = {
        "name": str(n),
        "processes": n,
        "concurrency": k * n,
        "in_flight_per_process": k,
        "load_generators": len(parts),
        "load_generator_cpus": groups if plan.pinned else None,
        "requests": sum(p["requests"] for p in parts),
        "errors": errors,
        "throughput_rps": rps,
        # the slowest load-generator process's percentiles (each counts its own calls)
        **{q: max(p[q] for p in parts if q in p) for q in ("p50_ms", "p99_ms") if any(q in p for p in parts)},
        "client_cpu_share": sum(p["client_cpu_share"] for p in parts),  # load-generator cores busy
        "client_cpu_share_max": max(p["client_cpu_share"] for p in parts),
        "late_start_s": max(p.get("late_start_s", 0.0) for p in parts),
        "ranker_cpu_s": sum(cpu),
        "ranker_cores": sum(cpu) / step_s,
        "ranker_cores_each": [c / step_s for c in cpu],
        "ranker_cpu_ms_per_request": 1e3 * sum(cpu) / served if served else None,
    }
    if plan.pinned and plan.own_physical_up_to is not None:
        out["smt_siblings_shared"] = n > plan.own_physical_up_to
    return out


def _summarise(
    plan: CorePlan,
    machine: dict,
    pinning: dict | None,
    steps: list[dict],
    bundle: dict,
    startup_s: float,
    step_s: float,
    warmup_s: float,
) -> dict:
    best = {n: max((s for s in steps if s["processes"] == n), key=lambda s: s["throughput_rps"]) for n in plan.counts}
    one = best[1]["throughput_rps"]
    ratio = {str(n): b["throughput_rps"] / one if one else None for n, b in best.items()}
    if pinning is not None:
        pinning["load_generator_processes"] = {str(n): best[n]["load_generators"] for n in plan.counts}
    machine = machine | {"loadavg_end": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    two = ratio.get("2")
    return {  # keys as strings: the report is read back from JSON
        "mode": "pinned" if plan.pinned else "unpinned",
        "pinned": plan.pinned,
        "note": plan.note,
        "cores": len(machine["usable_cpus"]) if machine["usable_cpus"] else os.cpu_count(),  # this process may use
        "machine": machine,
        "pinning": pinning,
        "counts": plan.counts,
        "dropped_counts": plan.dropped,
        "bundle": bundle,
        "ranker_settings": "as served: services/ranker/server.py main() (torch and BLAS one thread each, "
        "gRPC pool of 8 workers), every A2V_RANKER_* setting at its default; each process its own copy of "
        "the embedded collection, the first one's stores of record shared (make run's wiring)",
        "client": "bench/loadgen.py processes (grpc.aio, raw bytes), one round-robin channel each over the "
        "count's rankers, started together on one window",
        "step_s": step_s,
        "warmup_s": warmup_s,
        "startup_s": startup_s,
        "in_flight_per_process": sorted({s["in_flight_per_process"] for s in steps}),
        "steps": steps,
        "best_rps": {str(n): b["throughput_rps"] for n, b in best.items()},
        "best_at": {str(n): b["concurrency"] for n, b in best.items()},
        # where the cores went at each count's best step
        "best_cpu": {
            str(n): {
                "ranker_cpu_ms_per_request": b.get("ranker_cpu_ms_per_request"),
                "ranker_cores": b.get("ranker_cores"),
                "client_cores": b.get("client_cpu_share"),
            }
            for n, b in best.items()
        },
        "ratio_to_one": ratio,
        "ideal_linear": {str(n): float(n) for n in plan.counts},
        "efficiency": {str(n): (r / n if r is not None else None) for n, r in zip(plan.counts, ratio.values())},
        # a count whose load generator was near a full core: the client may be what limited it
        "client_saturated": {str(n): b["client_cpu_share_max"] >= CLIENT_SATURATED for n, b in best.items()},
        "late_start_s_max": max(s["late_start_s"] for s in steps),
        # the two-process figure of issue 16 (also under these names in the gateway bench's results)
        "ratio": two,
        "ideal": 2.0,
        "targets": {
            "two_processes": TARGET_TWO_PROCESSES,
            # the target means two processes on two cores of their own: unpinned (the load generator on
            # the same cores) the figure is only indicative, and the target is not judged (None: n/a)
            "two_processes_met": bool(two and two >= TARGET_TWO_PROCESSES) if plan.pinned else None,
            "measured_pinned": plan.pinned,
        },
    }


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def describe(r: dict) -> list[str]:
    """The result in a few lines of text (the standalone run prints them; bench/report.py renders its own)."""
    lines = [f"{r['mode']}: {r['note']}"]
    if r.get("pinning"):
        p = r["pinning"]
        lines.append(
            "rankers on CPUs "
            + ", ".join(f"{k} {v}" for k, v in p["rankers"].items())
            + f"; load generator and bench on {p['load_generator']}"
        )
    b = r["bundle"]
    lines.append(f"bundle {b['version']} ({b['kind']}): {b['items']} items × {b['vector_dim']} dims")
    for n in map(str, r["counts"]):
        c = r["best_cpu"][n]
        lines.append(
            f"{n:>2} process(es): {r['best_rps'][n]:7.0f} req/s at {r['best_at'][n]} in flight = "
            f"{_f(r['ratio_to_one'][n])}× one (ideal {r['ideal_linear'][n]:g}×, efficiency {_f(r['efficiency'][n])}); "
            f"ranker CPU {_f(c['ranker_cpu_ms_per_request'])} ms/request, rankers {_f(c['ranker_cores'])} cores busy, "
            f"load generator {_f(c['client_cores'])}"
            + (" (load generator near a full core)" if r["client_saturated"][n] else "")
        )
    if r.get("ratio") is not None:
        lines.append(
            f"2 processes / 1: {r['ratio']:.2f}× (target ≥ {r['targets']['two_processes']:g}×: "
            + {True: "met", False: "missed", None: "not judged: unpinned"}[r["targets"]["two_processes_met"]]
            + ")"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.processes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir to serve (default: as the bench finds one)")
    ap.add_argument(
        "--counts", default=None, help="ranker process counts, e.g. 1,2,4,8 (default: what the cores allow)"
    )
    ap.add_argument(
        "--in-flight",
        default=",".join(map(str, PER_PROCESS_CONCURRENCY)),
        help="requests in flight per ranker process, one step each (default 4,8,16)",
    )
    ap.add_argument("--step-s", type=float, default=4.0)
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--unpinned", action="store_true", help="1 vs 2 processes unpinned whatever the machine")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--logs", type=Path, default=None, help="copy the rankers' logs into this directory")
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.counts.split(",")] if a.counts else None
    if counts is not None and (not counts or min(counts) < 1):
        ap.error("--counts: whole numbers ≥ 1")
    in_flight = [int(x) for x in a.in_flight.split(",")]
    bundle = a.bundle.resolve() if a.bundle else None
    if bundle is not None and not (bundle / "manifest.json").is_file():
        ap.error(f"--bundle {bundle}: no manifest.json there")
    start = time.perf_counter()
    raise_on_signals()  # SIGTERM (a timeout) stops the rankers too: they run in sessions of their own

    def progress(message: str) -> None:
        print(f"[processes {time.perf_counter() - start:6.1f} s] {message}", flush=True)

    result = run_processes_bench(
        bundle,
        counts,
        in_flight,
        step_s=a.step_s,
        warmup_s=a.warmup_s,
        bundle_kind="given (--bundle)" if bundle else "given",
        progress=progress,
        allow_pinning=not a.unpinned,
        logs_to=a.logs,
    )
    result["elapsed_s"] = time.perf_counter() - start
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(describe(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

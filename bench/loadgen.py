"""A gRPC load generator that runs in its own process (grpc.aio, one event loop), so the client's
Python work never shares a GIL with the servers it measures.

Requests are raw serialized bytes sent through a generic unary-unary call, and responses stay
bytes, so the client does no protobuf work and costs the same for every target. Two modes:

- closed loop: `concurrency` callers, each sends its next request as soon as the previous one
  answers, for `duration_s` (after `warmup_s` that is not counted): throughput and latency at a
  fixed number of requests in flight;
- open loop: requests start at a fixed `rate_rps` whatever the answers do, and latency is counted
  from the scheduled start, so a stalled server shows as latency (no coordinated omission).

`run_plan(steps)` runs steps one after another in a child process (`python -m bench.loadgen`) and
returns one dict per step; `cpus` pins that process to those cores. Several load-generator processes
drive one target together when their steps share a `start_at` (bench/processes.py).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Step:
    name: str  # label of the target ("echo", "gateway", ...)
    address: str  # host:port
    method: str  # full method path, "/package.Service/Method"
    payloads: list[bytes]  # serialized requests, sent round-robin
    metadata: tuple = ()  # ((key, value), ...) sent with every call
    concurrency: int = 1  # closed loop: requests in flight
    rate_rps: float | None = None  # open loop when set
    duration_s: float = 4.0
    warmup_s: float = 1.0
    timeout_s: float = 10.0
    extra: dict = field(default_factory=dict)  # copied into the result (e.g. the concurrency step)
    # channel options, e.g. (("grpc.lb_policy_name", "round_robin"),) to spread calls over the
    # addresses of an "ipv4:host:port,host:port" target
    options: tuple = ()
    # wall-clock time (time.time()) at which the step's load starts, once connected: several
    # load-generator processes then count the same window; None: at once
    start_at: float | None = None


def summarise(latencies: list[float], errors: dict[str, int], window_s: float) -> dict:
    lat = np.asarray(latencies, dtype=np.float64) * 1e3
    out = {
        "requests": int(len(lat)),
        "errors": dict(errors),
        "window_s": window_s,
        "throughput_rps": len(lat) / window_s if window_s > 0 else 0.0,
    }
    if len(lat):
        out.update(
            p50_ms=float(np.percentile(lat, 50)),
            p90_ms=float(np.percentile(lat, 90)),
            p99_ms=float(np.percentile(lat, 99)),
            mean_ms=float(lat.mean()),
            max_ms=float(lat.max()),
        )
    return out


async def _closed(call, step: Step) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    count_from, stop_at = start + step.warmup_s, start + step.warmup_s + step.duration_s
    counter = iter(range(1 << 62))

    async def caller():
        import grpc

        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            payload = step.payloads[next(counter) % len(step.payloads)]
            try:
                await call(payload, metadata=step.metadata, timeout=step.timeout_s)
                ok = True
            except grpc.aio.AioRpcError as e:
                ok, code = False, e.code().name
            t1 = time.perf_counter()
            if count_from <= t1 <= stop_at:  # completions inside the counted window (steady state)
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors[code] = errors.get(code, 0) + 1

    await asyncio.gather(*(caller() for _ in range(step.concurrency)))
    return summarise(latencies, errors, step.duration_s)


async def _open(call, step: Step) -> dict:
    import grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    interval = 1.0 / step.rate_rps
    start = time.perf_counter() + 0.05
    n_warm = int(step.warmup_s * step.rate_rps)
    n_total = n_warm + int(step.duration_s * step.rate_rps)

    async def one(i: int, scheduled: float):
        try:
            await call(step.payloads[i % len(step.payloads)], metadata=step.metadata, timeout=step.timeout_s)
            if i >= n_warm:
                latencies.append(time.perf_counter() - scheduled)
        except grpc.aio.AioRpcError as e:
            if i >= n_warm:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    tasks = []
    for i in range(n_total):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, scheduled)))
    late_by = time.perf_counter() - (start + (n_total - 1) * interval)  # > 0: the client could not keep up
    await asyncio.gather(*tasks)
    out = summarise(latencies, errors, step.duration_s)
    out["offered_rps"] = step.rate_rps
    out["client_late_s"] = max(0.0, late_by)
    return out


async def _run_step(step: Step) -> dict:
    import grpc

    async with grpc.aio.insecure_channel(step.address, options=list(step.options)) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_unary(step.method)  # no (de)serializers: bytes in, bytes out
        for p in step.payloads[:3]:  # connect and touch the path before timing
            await call(p, metadata=step.metadata, timeout=step.timeout_s)
        late_s = 0.0
        if step.start_at is not None:
            if (wait := step.start_at - time.time()) > 0:
                await asyncio.sleep(wait)
            else:  # this process started too slowly: its window begins after the others'
                late_s = -wait
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = await (_open(call, step) if step.rate_rps else _closed(call, step))
        result["client_cpu_share"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        if step.start_at is not None:
            result["late_start_s"] = late_s
    return {
        "name": step.name,
        "address": step.address,
        "method": step.method,
        "concurrency": None if step.rate_rps else step.concurrency,
        **step.extra,
        **result,
    }


def _child() -> int:
    """`python -m bench.loadgen`: a pickled list of Step dicts on stdin, a pickled result on stdout."""
    steps = pickle.load(sys.stdin.buffer)
    try:
        out = ("ok", [asyncio.run(_run_step(Step(**s))) for s in steps])
    except BaseException as e:  # report to the parent instead of dying with a traceback only
        out = ("error", f"{type(e).__name__}: {e}")
    pickle.dump(out, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def run_plan(steps: list[Step], timeout_s: float | None = None, cpus: Collection[int] | None = None) -> list[dict]:
    """Run the steps in order in a fresh Python process (nothing imported but grpc and numpy), on
    `cpus` when given (Linux: its CPU affinity, set before it imports anything)."""
    waits = [s.start_at - time.time() for s in steps if s.start_at is not None]
    budget = timeout_s or sum(s.warmup_s + s.duration_s + 30 for s in steps) + max([0.0, *waits])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        if cpus is not None:
            os.sched_setaffinity(proc.pid, cpus)  # threads it starts later inherit the mask
        stdout, stderr = proc.communicate(pickle.dumps([asdict(s) for s in steps]), timeout=budget)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0 or not stdout:
        raise RuntimeError(f"load generator exited with {proc.returncode}: {stderr.decode()[-2000:]}")
    status, value = pickle.loads(stdout)
    if status != "ok":
        raise RuntimeError(f"load generator failed: {value}")
    return value


if __name__ == "__main__":
    sys.exit(_child())

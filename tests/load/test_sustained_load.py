"""Sustained load over real sockets: a closed-loop client at a concurrency the three services sustain,
mixing Recommend, Similar, ResolveTitles and SearchText for A2V_LOAD_SECONDS (default 20 s).

Outcomes, not timings: every request succeeds, the gateway counted exactly the calls the client
made (none lost, none retried into extra work), and each service's RSS after warm-up stays flat
(growth under RSS_GROWTH_BOUND)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter

import grpc
import pytest

from tests.e2e.support import Stack
from tests.load.support import LOAD_SECONDS, ClosedLoop, codes_seen, gateway_mix, rss_bytes, scaled, scrape

pytestmark = pytest.mark.load

CONCURRENCY = 4  # clients in flight; far below every MAX_CONCURRENT_RPCS (64)
WARMUP_FRACTION = 0.3  # caches, thread pools and allocator arenas fill up first
RSS_GROWTH_BOUND = 30 * 2**20  # after warm-up, per service
METHODS = {"recommend": "Recommend", "similar": "Similar", "resolve": "ResolveTitles", "search": "SearchText"}


class RssSampler:
    """RSS of each service process every `every_s`, as (time, {name: bytes})."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.5):
        self.pids, self.every_s = pids, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.monotonic(), {n: rss_bytes(p) for n, p in self.pids.items()}))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def growth(self, after: float, window_s: float = 2.0) -> dict[str, tuple[int, int]]:
        """{name: (baseline, end)}: medians of the samples in the first and the last `window_s`
        after `after` (medians: one sample taken mid-garbage-collection does not decide)."""
        kept = [(t, r) for t, r in self.samples if t >= after]
        assert len(kept) >= 6, f"only {len(kept)} RSS samples after warm-up"
        first = [r for t, r in kept if t <= kept[0][0] + window_s]
        last = [r for t, r in kept if t >= kept[-1][0] - window_s]
        return {
            n: (int(statistics.median(r[n] for r in first)), int(statistics.median(r[n] for r in last)))
            for n in self.pids
        }


def test_sustained_mixed_load_has_no_failures_and_flat_memory(stack: Stack):
    before = scrape(stack.metrics_url("gateway"))
    kinds, make = gateway_mix(stack.gateway)
    pids = {name: p.proc.pid for name, p in stack.procs.items()}
    with RssSampler(pids) as rss, ClosedLoop(kinds, make, scaled(CONCURRENCY)) as load:
        start = time.monotonic()
        time.sleep(LOAD_SECONDS)
    outcomes = load.snapshot()

    by_code = Counter(o.code for o in outcomes)
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    problems = Counter((o.kind, o.code.name, o.reason, o.message[:80]) for o in failed)
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {problems}"
    per_kind = Counter(o.kind for o in outcomes)
    assert all(per_kind[k] >= 5 for k in kinds), f"too few requests of some kind to call it load: {per_kind}"

    # the gateway handled exactly what the client sent, all OK (nothing lost or answered twice)
    after = scrape(stack.metrics_url("gateway"))
    for kind, method in METHODS.items():
        full = f"anime2vec.v1.GatewayService/{method}"
        was = codes_seen(before, "gateway", full)
        done = {c: n - was.get(c, 0) for c, n in codes_seen(after, "gateway", full).items()}
        assert {c: n for c, n in done.items() if n} == {"OK": per_kind[kind]}, (kind, done)

    growth = rss.growth(after=start + WARMUP_FRACTION * LOAD_SECONDS)
    report = {n: f"{b / 2**20:.0f} → {e / 2**20:.0f} MiB" for n, (b, e) in growth.items()}
    print(f"\n{sum(by_code.values())} requests in {LOAD_SECONDS:.0f} s ({dict(per_kind)}); RSS after warm-up: {report}")
    grown = {n: report[n] for n, (b, e) in growth.items() if e - b >= RSS_GROWTH_BOUND}
    assert not grown, f"RSS grew by {RSS_GROWTH_BOUND / 2**20:.0f} MiB or more under steady load: {grown}"

"""What the load, overload and fault tests share: the services as processes with per-test settings,
a closed-loop client over real sockets, per-process RSS, a counting gRPC pass-through, metrics.

Sizes scale with two environment variables (CI runs the defaults):
  A2V_LOAD_SECONDS  how long the sustained-load test runs (default 20)
  A2V_LOAD_SCALE    multiplier for client concurrency and burst sizes (default 1)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from anime2vec.runlocal import ServiceProcess
from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.support import AUTH, STARTUP_TIMEOUT_S, Stack, stack_processes

S = common_pb2
LOAD_SECONDS = float(os.environ.get("A2V_LOAD_SECONDS", "20"))
LOAD_SCALE = max(1.0, float(os.environ.get("A2V_LOAD_SCALE", "1")))
ALIAS_POLL_S = 0.2  # the shared ranker follows the collection alias this often


def scaled(n: int) -> int:
    return max(1, round(n * LOAD_SCALE))


# ---- processes -----------------------------------------------------------------------------------


def start_together(procs: Mapping[str, ServiceProcess]) -> None:
    """Start every process at once (a gateway retries until its ranker answers), then wait until
    each is SERVING; on failure stop them all."""
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_serving(STARTUP_TIMEOUT_S)
    except BaseException:
        for p in procs.values():
            p.stop()
        raise


def start_stack(root: Path, bundle: Path, **kwargs) -> dict[str, ServiceProcess]:
    """stack_processes(...), started and SERVING."""
    procs = stack_processes(root, bundle, **kwargs)
    start_together(procs)
    return procs


_SHARED: dict[str, Stack] = {}


def shared_stack(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Stack:
    """The one stack tests/load and tests/faults share in a session (a session fixture defined in
    two conftests would start two): encoder, ranker and gateway with default limits; the ranker
    serves a copy of `bundle` from a store of its own and follows the alias (ALIAS_POLL_S), so a
    test may add bundles to that store. Stopped when the session ends."""
    if "stack" not in _SHARED:
        root = tmp_path_factory.mktemp("stack")
        own = shutil.copytree(bundle, root / "models" / bundle.name)
        procs = start_stack(root, own, env={"ranker": {"ALIAS_POLL_S": str(ALIAS_POLL_S)}})
        stack = _SHARED["stack"] = stack_of(procs, own)

        def stop() -> None:
            stack.channel.close()
            stop_all(procs)
            _SHARED.pop("stack", None)

        config.add_cleanup(stop)
    return _SHARED["stack"]


def stack_of(procs: dict[str, ServiceProcess], bundle: Path) -> Stack:
    channel = grpc.insecure_channel(procs["gateway"].spec.address)
    return Stack(procs, channel, gateway_pb2_grpc.GatewayServiceStub(channel), bundle)


def stop_all(procs: Mapping[str, ServiceProcess]) -> None:
    for name in ("gateway", "ranker", "encoder"):
        if name in procs:
            procs[name].stop()


def kill9(proc: ServiceProcess) -> None:
    """SIGKILL: no graceful shutdown, nothing flushed by the process itself."""
    assert proc.alive(), f"{proc.spec.name} is not running"
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(30)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (psutil is not a dependency: /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> None:
    """Poll until predicate() holds; AssertionError naming `what` after timeout_s (a hang guard,
    not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)


# ---- metrics -------------------------------------------------------------------------------------


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def metric(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in body.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def codes_seen(body: str, service: str, method: str) -> dict[str, float]:
    """a2v_rpc_requests_total of one method by code."""
    out: dict[str, float] = {}
    for code in grpc.StatusCode:
        n = metric(body, "a2v_rpc_requests_total", service=service, method=method, code=code.name)
        if n:
            out[code.name] = n
    return out


# ---- clients -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str
    code: grpc.StatusCode
    reason: str = ""  # ErrorInfo reason of a failure
    message: str = ""
    retry_after_s: float | None = None  # RetryInfo of a failure
    at: float = 0.0  # time.monotonic() when it completed


def outcome_of(kind: str, call: Callable[[], object]) -> Outcome:
    try:
        call()
        return Outcome(kind, grpc.StatusCode.OK, at=time.monotonic())
    except grpc.RpcError as e:
        d = ErrorDetails.from_rpc_error(e)
        return Outcome(kind, d.code, d.reason, d.message, d.retry_after_s, time.monotonic())


# Popular titles of the sample catalogue (every bundle the tests train holds them).
FAVOURITES = [
    "Death Note",
    "Naruto",
    "Cowboy Bebop",
    "Fullmetal Alchemist",
    "Shingeki no Kyojin",
    "Elfen Lied",
    "Angel Beats!",
    "Neon Genesis Evangelion",
    "Toradora!",
    "Steins;Gate",
    "Clannad",
    "Soul Eater",
]
WORDS = [
    "pirates",
    "robots",
    "school",
    "magic",
    "detective",
    "space",
    "samurai",
    "music",
    "sports",
    "demons",
    "friendship",
    "revenge",
    "war",
    "cooking",
    "time travel",
    "vampires",
    "idols",
    "racing",
    "ghosts",
    "a small village",
    "a lost sister",
    "an old sword",
    "the last city",
    "giant monsters",
]


def text_query(rng: random.Random) -> str:
    """A free-text query from a vocabulary large enough that most are new to the gateway's cache
    (so the encoder really encodes them)."""
    return " ".join(rng.sample(WORDS, 3)) + f" #{rng.randrange(10**6)}"


def gateway_mix(
    gateway: gateway_pb2_grpc.GatewayServiceStub,
    kinds: Sequence[str] = ("recommend", "similar", "resolve", "search"),
    timeout_s: float = 30.0,
):
    """(kind, call) makers for the public RPCs a closed-loop client mixes."""

    def make(kind: str, rng: random.Random) -> Callable[[], object]:
        if kind == "recommend":
            favs = [S.AnimeRef(title=t) for t in rng.sample(FAVOURITES, rng.randint(1, 3))]
            req = gateway_pb2.RecommendRequest(favourites=favs, options=S.RecommendOptions(limit=10))
            return lambda: gateway.Recommend(req, metadata=AUTH, timeout=timeout_s)
        if kind == "similar":
            req = gateway_pb2.SimilarRequest(anime=S.AnimeRef(title=rng.choice(FAVOURITES)))
            return lambda: gateway.Similar(req, metadata=AUTH, timeout=timeout_s)
        if kind == "resolve":
            req = gateway_pb2.ResolveTitlesRequest(query=rng.choice(FAVOURITES)[: rng.randint(3, 8)], limit=5)
            return lambda: gateway.ResolveTitles(req, metadata=AUTH, timeout=timeout_s)
        if kind == "search":
            req = gateway_pb2.SearchTextRequest(query=text_query(rng), options=S.RecommendOptions(limit=10))
            return lambda: gateway.SearchText(req, metadata=AUTH, timeout=timeout_s)
        raise ValueError(kind)

    return list(kinds), make


class ClosedLoop:
    """`concurrency` client threads, each sending its next request when the last one answered,
    cycling through `kinds`; every answer is recorded as an Outcome."""

    def __init__(
        self,
        kinds: Sequence[str],
        make: Callable[[str, random.Random], Callable[[], object]],
        concurrency: int,
        pause_s: float = 0.0,
    ):
        self.kinds, self.make, self.concurrency, self.pause_s = list(kinds), make, concurrency, pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def _run(self, worker: int) -> None:
        rng = random.Random(worker)
        j = worker
        while not self._stop.is_set():
            kind = self.kinds[j % len(self.kinds)]
            j += 1
            out = outcome_of(kind, self.make(kind, rng))
            with self._lock:
                self.outcomes.append(out)
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self) -> "ClosedLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck in a call"

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_for(self, predicate: Callable[[list[Outcome]], bool], timeout_s: float, what: str) -> None:
        wait_until(lambda: predicate(self.snapshot()), timeout_s, what)

    def summary(self, outcomes: Sequence[Outcome] | None = None) -> Counter:
        return Counter((o.kind, o.code.name, o.reason) for o in (self.snapshot() if outcomes is None else outcomes))


def burst(calls: Sequence[Callable[[], grpc.Future]]) -> list[Outcome]:
    """Start every call at once (non-blocking futures on one channel), then collect each outcome:
    `len(calls)` RPCs in flight together."""
    started = [c() for c in calls]
    out = []
    for f in started:
        try:
            f.result()
            out.append(Outcome("burst", grpc.StatusCode.OK, at=time.monotonic()))
        except grpc.RpcError as e:
            d = ErrorDetails.from_rpc_error(e)
            out.append(Outcome("burst", d.code, d.reason, d.message, d.retry_after_s, time.monotonic()))
    return out


# ---- a counting pass-through ---------------------------------------------------------------------


class CountingProxy:
    """A gRPC pass-through in this process: forwards every unary call as raw bytes to `target` and
    relays the answer (status, message and rich details included), counting attempts by
    (method, code). `inject = (code, message)` answers every call with that status instead, still
    counted. Put between the gateway and the ranker, it shows how many attempts the gateway made
    per call of its own caller (its retry policy at work)."""

    def __init__(self, target: str):
        self._channel = grpc.insecure_channel(target)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.inject: tuple[grpc.StatusCode, str] | None = None
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(32, thread_name_prefix="proxy"))
        self.server.add_generic_rpc_handlers([_ProxyHandler(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def attempts(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self.counts.items() if m.endswith("/" + method) and code in (None, c))

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        with self._lock:
            self.counts[(method, code.name)] += 1

    def close(self) -> None:
        self.server.stop(None)
        self._channel.close()


class _ProxyHandler(grpc.GenericRpcHandler):
    def __init__(self, proxy: CountingProxy):
        self.proxy = proxy

    def service(self, handler_call_details):
        method = handler_call_details.method
        forward = self.proxy._channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            injected = self.proxy.inject
            if injected is not None:
                self.proxy._count(method, injected[0])
                context.abort(*injected)
            try:
                response = forward(request, timeout=min(context.time_remaining(), 60.0))
            except grpc.RpcError as e:
                self.proxy._count(method, e.code())
                context.set_trailing_metadata(tuple(e.trailing_metadata() or ()))
                context.abort(e.code(), e.details() or "")
            self.proxy._count(method, grpc.StatusCode.OK)
            return response

        return grpc.unary_unary_rpc_method_handler(relay)

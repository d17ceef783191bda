"""A real gateway process in front of an in-process stand-in ranker, for the hostile-client tests.

The gateway is started exactly as in production (`python -m services.gateway.server`, settings from
the environment, its own gRPC and metrics ports); only its ranker is replaced by `FakeRanker`, a small
gRPC server in the test process that serves a four-anime catalogue and records the writes it gets.
The encoder address points at a port nothing listens on (free text fails UNAVAILABLE), which keeps
these tests independent of trained bundles and cheap enough for a 2-core machine.

Keys (A2V_GATEWAY_API_KEYS): READER is a bare key (read + feedback), ADMIN has every scope, READ_ONLY
can only read.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from anime2vec.runlocal import ServiceProcess, ServiceSpec, free_ports
from anime2vec.serving.errors import unavailable
from anime2vec.v1 import common_pb2, gateway_pb2_grpc, ranker_pb2, ranker_pb2_grpc

S = common_pb2
READER, ADMIN, READ_ONLY = "reader-key-0001", "admin-key-0002", "readonly-key-0003"
API_KEYS = f"{READER},{ADMIN}:read+feedback+catalog,{READ_ONLY}:read"
STARTUP_TIMEOUT_S = 120
VERSION = "fake-v1"
CATALOGUE = [(1, "Cowboy Bebop"), (20, "Naruto"), (121, "Fullmetal Alchemist"), (269, "Bleach")]


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


class FakeRanker(ranker_pb2_grpc.RankerServiceServicer):
    """Answers what the gateway asks of a ranker; remembers every UpsertAnime request."""

    SLOW_ID = 4242  # RecommendFromFavourites with this liked id answers only when release_slow is set
    # ... and with this one as a ranker whose encoder is down answers: naming the encoder's address
    ENCODER_DOWN_ID, ENCODER_ADDRESS = 4343, "10.1.2.3:50051"

    def __init__(self, limits: common_pb2.RequestLimits | None = None) -> None:
        self.limits = limits  # None: a ranker that reports no limits (the gateway keeps the shared defaults)
        self.upserts: list[ranker_pb2.UpsertAnimeRequest] = []
        self.upsert_metadata: list[dict[str, str]] = []
        self.release_slow = threading.Event()
        self._lock = threading.Lock()

    def GetModelInfo(self, request, context):
        return S.GetModelInfoResponse(
            model=S.ModelInfo(version=VERSION, encoder_name="fake", encoder_dim=8, n_items=len(CATALOGUE)),
            limits=self.limits,
        )

    def ListCatalog(self, request, context):
        return ranker_pb2.ListCatalogResponse(
            entries=[ranker_pb2.CatalogEntry(anime_id=a, title=t, members=1000 - a) for a, t in CATALOGUE],
            model_version=VERSION,
        )

    def _ranked(self) -> ranker_pb2.RankedList:
        return ranker_pb2.RankedList(
            recommendations=[
                S.Recommendation(anime_id=a, title=t, score=1.0, rank=i + 1) for i, (a, t) in enumerate(CATALOGUE[:2])
            ],
            served_by=S.ServedBy(strategy=S.STRATEGY_DROPOUTNET, model_version=VERSION),
        )

    def RecommendFromFavourites(self, request, context):
        if self.SLOW_ID in request.liked_ids:
            self.release_slow.wait(30)
        if self.ENCODER_DOWN_ID in request.liked_ids:
            context.abort_with_status(
                unavailable(
                    f"encoder at {self.ENCODER_ADDRESS} unavailable (UNAVAILABLE)",
                    reason="ENCODER_UNAVAILABLE",
                    retry_after_s=1.0,
                ).to_status()
            )
        return self._ranked()

    def SimilarItems(self, request, context):
        return self._ranked()

    def RecommendForUser(self, request, context):
        return self._ranked()

    def RecordFeedback(self, request, context):
        return ranker_pb2.FeedbackResult(applied=len(request.events), model_version=VERSION)

    def UpsertAnime(self, request, context):
        with self._lock:
            self.upserts.append(request)
            self.upsert_metadata.append(dict(context.invocation_metadata()))
            aid = request.anime_id if request.HasField("anime_id") else 100_000_000 + len(self.upserts)
        return ranker_pb2.UpsertAnimeResponse(
            anime_id=aid, created=not request.HasField("anime_id"), model_version=VERSION
        )


@dataclass
class Gateway:
    proc: ServiceProcess
    ranker: FakeRanker
    ranker_server: grpc.Server
    ranker_address: str
    encoder_address: str  # nothing listens there
    channel: grpc.Channel
    stub: gateway_pb2_grpc.GatewayServiceStub
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.proc.spec.address

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def metrics(self) -> str:
        url = f"http://{self.proc.spec.host}:{self.proc.spec.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=30).read().decode()

    def own_channel(self) -> grpc.Channel:
        """A channel on a connection of its own (gRPC shares connections between channels with the
        same settings by default): what a second, separate client would have."""
        channel = grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return channel

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


def start_gateway(
    root: Path, env: Mapping[str, str] | None = None, ranker_limits: common_pb2.RequestLimits | None = None
) -> tuple[Gateway, Callable[[], None]]:
    """A fake ranker in this process (reporting `ranker_limits`) and a real gateway process in front of
    it, SERVING (its title index loaded). Returns the gateway and a function that stops both."""
    ranker = FakeRanker(ranker_limits)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    ranker_pb2_grpc.add_RankerServiceServicer_to_server(ranker, server)
    ranker_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    grpc_port, metrics_port, dead_port = free_ports(3)
    spec = ServiceSpec(
        "gateway",
        "services.gateway.server",
        "anime2vec.v1.GatewayService",
        "127.0.0.1",
        grpc_port,
        metrics_port,
        env={
            "RANKER_ADDRESS": f"127.0.0.1:{ranker_port}",
            "ENCODER_ADDRESS": f"127.0.0.1:{dead_port}",
            "API_KEYS": API_KEYS,
            "CATALOG_POLL_S": "60",
            "RANKER_TIMEOUT_S": "5",
            "ENCODER_TIMEOUT_S": "2",
            **(env or {}),
        },
    )
    proc = ServiceProcess(spec, root / "gateway.log")
    proc.start()
    try:
        proc.wait_serving(STARTUP_TIMEOUT_S)
    except BaseException:
        proc.stop()
        server.stop(None)
        raise
    channel = grpc.insecure_channel(spec.address)
    gw = Gateway(
        proc,
        ranker,
        server,
        f"127.0.0.1:{ranker_port}",
        f"127.0.0.1:{dead_port}",
        channel,
        gateway_pb2_grpc.GatewayServiceStub(channel),
    )

    def stop() -> None:
        for ch in [channel, *gw.channels]:
            ch.close()
        proc.stop()
        server.stop(None)

    return gw, stop


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until predicate() holds; a hang guard (AssertionError naming `what`), not a timing check."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? ")


def series(body: str, name: str | None = None) -> list[str]:
    """The sample lines of a /metrics body (every label set of every metric), optionally of one
    metric family (`name` with or without the _total/_bucket/... suffix)."""
    out = []
    for line in body.splitlines():
        m = _SAMPLE.match(line)
        if m and (name is None or m.group(1).startswith(name)):
            out.append(line)
    return out


def gauge(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in series(body, name):
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', metric))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total

"""What the end-to-end tests share: keys, free ports, and the services as processes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from anime2vec.runlocal import ServiceProcess, free_ports, standard_specs
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

API_KEYS = ("e2e-key-1", "e2e-key-2")
# The gateway's key setting: the first key has every scope (AddAnime needs catalog), the second is
# bare (read+feedback), so a scope refusal stays testable. AUTH presents the first.
GATEWAY_API_KEYS = f"{API_KEYS[0]}:read+feedback+catalog,{API_KEYS[1]}"
AUTH = [("authorization", f"Bearer {API_KEYS[0]}")]
STARTUP_TIMEOUT_S = 300


@dataclass
class Stack:
    procs: dict[str, ServiceProcess]
    channel: grpc.Channel
    gateway: gateway_pb2_grpc.GatewayServiceStub
    bundle: Path

    def metrics_url(self, name: str) -> str:
        spec = self.procs[name].spec
        return f"http://{spec.host}:{spec.metrics_port}/metrics"

    def stop(self, name: str) -> None:
        assert self.procs[name].stop() == 0, f"{name} did not exit cleanly:\n{self.procs[name].log_tail()}"

    def start(self, name: str) -> None:
        self.procs[name].start()
        self.procs[name].wait_serving(STARTUP_TIMEOUT_S)

    def ensure_running(self) -> None:
        restarted = [name for name in ("encoder", "ranker", "gateway") if not self.procs[name].alive()]
        for name in restarted:
            self.start(name)
        self.wait_answering(through_encoder="encoder" in restarted)

    def wait_answering(self, timeout_s: float = 60, through_encoder: bool = False) -> None:
        """Until the gateway answers a ranker-backed call (its channel reconnects after a restart) and,
        with `through_encoder`, a free-text one: after the encoder was down, the gateway's channel to
        it reconnects on its own back-off (up to 2 s), and a call before that is UNAVAILABLE."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.gateway.GetModelInfo(common_pb2.GetModelInfoRequest(), metadata=AUTH, timeout=5)
                if through_encoder:
                    self.gateway.SearchText(gateway_pb2.SearchTextRequest(query="ready"), metadata=AUTH, timeout=30)
                    # the ranker's own channel to the encoder (AddAnime) reconnects on its back-off too, and no
                    # call reaches it without a side effect: wait out that back-off's ceiling (2 s, ±20%,
                    # anime2vec/serving/encoder_client.py) so the next test's first AddAnime finds it connected
                    time.sleep(2.5)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def stack_processes(
    root: Path,
    bundle: Path,
    *,
    names: Sequence[str] = ("encoder", "ranker", "gateway"),
    env: Mapping[str, Mapping[str, str]] | None = None,
    encoder_address: str | None = None,
    ranker_address: str | None = None,
) -> dict[str, ServiceProcess]:
    """The services `names` of the standard three (ranker data and logs under root, serving `bundle` from its store), not started yet, with settings per service (`env`:
    name → {"MAX_WORKERS": "2", ...}, without the prefix) and an encoder or ranker already
    running elsewhere (`*_address`)."""
    ports = free_ports(6)
    specs = standard_specs(
        "127.0.0.1",
        {"encoder": tuple(ports[0:2]), "ranker": tuple(ports[2:4]), "gateway": tuple(ports[4:6])},
        encoder_model="minilm",
        model_store=bundle.parent,
        bundle=bundle.name,
        ranker_data_dir=root / "ranker",
        gateway_env={"API_KEYS": GATEWAY_API_KEYS, "CATALOG_POLL_S": "2"},
    )
    procs: dict[str, ServiceProcess] = {}
    for spec in specs:
        if encoder_address and spec.name != "encoder":
            spec.env["ENCODER_ADDRESS"] = encoder_address
        if ranker_address and spec.name == "gateway":
            spec.env["RANKER_ADDRESS"] = ranker_address
        if spec.name == "ranker":
            # the int8 scan is what "auto" picks for a full-size bundle on this CPU; on the sample's small
            # matrix it may pick either, so the tests pin it (a CPU without an exact int8 product scans
            # float32 instead, with a warning in the ranker's log)
            spec.env["SEARCH_PRECISION"] = "int8"
        spec.env.update((env or {}).get(spec.name, {}))
        if spec.name in names:
            procs[spec.name] = ServiceProcess(spec, root / "logs" / f"{spec.name}.log")
    return procs


def start_services(
    root: Path,
    bundle: Path,
    names: tuple[str, ...] = ("encoder", "ranker", "gateway"),
    encoder_address: str | None = None,
) -> dict[str, ServiceProcess]:
    """Start `names` of the standard three (ranker data and logs under root), wired together;
    encoder_address points the others at an encoder already running instead."""
    procs = stack_processes(root, bundle, names=names, encoder_address=encoder_address)
    try:
        for name in ("encoder", "ranker"):  # both load models: start them together
            if name in procs:
                procs[name].start()
        for name in ("encoder", "ranker"):
            if name in procs:
                procs[name].wait_serving(STARTUP_TIMEOUT_S)
        if "gateway" in procs:
            procs["gateway"].start()
            procs["gateway"].wait_serving(STARTUP_TIMEOUT_S)
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs

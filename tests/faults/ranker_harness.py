"""A ranker on its own, as a real process on loopback, for the tests that damage its state on disk,
play hostile callers or kill it (tests/faults/test_ranker_*.py, tests/security/test_ranker_*.py,
the crash drill).

It serves the sample bundle trained with the tiny-random encoder (2 epochs, ~1.5 min on 2 cores,
once per test session; `A2V_TINY_BUNDLE=<bundle dir>` serves an existing one instead), from a store
of its own (a link to the bundle) and a data directory of its own, and calls one shared tiny-random
encoder for UpsertAnime. Each ranker's JSON log lines go to a file the tests read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from anime2vec.bundle import list_bundles
from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV, ServiceProcess, ServiceSpec, free_ports
from anime2vec.v1 import ranker_pb2_grpc

TRAIN_TIMEOUT_S = 900
STARTUP_TIMEOUT_S = 300  # hang guards, not timing assertions
_SESSION: dict[str, object] = {}


def train_tiny_bundle(root: Path) -> Path:
    """The sample bundle with the tiny-random encoder, trained through the CLI into root/models."""
    store = root / "models"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "anime2vec.cli",
            "train",
            "--sample",
            "--encoder",
            "tiny-random",
            "--epochs",
            "2",
            "--models",
            "wmf",
            "--test-queries",
            "50",
            "--quiet",
            "--store",
            str(store),
            "--report-dir",
            str(root / "report"),
        ],
        cwd=REPO_ROOT,
        env=os.environ | OFFLINE_ENV | {"A2V_CACHE_DIR": str(root / "cache")},
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    if run.returncode != 0:
        raise RuntimeError(f"training the tiny bundle failed:\n{run.stderr[-4000:]}")
    (bundle,) = list_bundles(store)
    return bundle


def encoder_process(root: Path) -> ServiceProcess:
    grpc_port, metrics_port = free_ports(2)
    spec = ServiceSpec(
        "encoder",
        "services.encoder.server",
        "anime2vec.v1.EncoderService",
        "127.0.0.1",
        grpc_port,
        metrics_port,
        env={"MODEL": "tiny-random"},
    )
    return ServiceProcess(spec, root / "encoder.log")


def session_bundle_and_encoder(tmp_path_factory, add_cleanup) -> tuple[Path, str]:
    """(tiny bundle, address of a running tiny-random encoder), made once per test process;
    add_cleanup(fn) stops the encoder when the session ends (pytest's config.add_cleanup)."""
    if "bundle" not in _SESSION:
        if os.environ.get("A2V_TINY_BUNDLE"):
            _SESSION["bundle"] = Path(os.environ["A2V_TINY_BUNDLE"]).resolve()
        else:
            _SESSION["bundle"] = train_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))
    if "encoder" not in _SESSION:
        encoder = encoder_process(tmp_path_factory.mktemp("tiny-encoder"))
        encoder.start()
        encoder.wait_serving(STARTUP_TIMEOUT_S)
        _SESSION["encoder"] = encoder

        def stop() -> None:
            encoder.stop()
            _SESSION.pop("encoder", None)

        add_cleanup(stop)
    return _SESSION["bundle"], _SESSION["encoder"].spec.address


@dataclass
class Ranker:
    """One ranker process over `data_dir` (kept across restarts: restarts reuse its ports)."""

    root: Path
    bundle: Path
    encoder_address: str
    env: Mapping[str, str] = field(default_factory=dict)  # extra A2V_RANKER_* settings, without the prefix
    pin_bundle: bool = True  # BUNDLE=<the bundle>; False: alias, else newest

    def __post_init__(self) -> None:
        store = self.root / "models"
        store.mkdir(parents=True, exist_ok=True)
        if not (store / self.bundle.name).exists():
            (store / self.bundle.name).symlink_to(self.bundle, target_is_directory=True)
        grpc_port, metrics_port = free_ports(2)
        settings = {
            "MODEL_STORE": str(store),
            "DATA_DIR": str(self.data_dir),
            "ENCODER_ADDRESS": self.encoder_address,
            "ALIAS_POLL_S": "0",
            "MAX_WORKERS": "8",
            **({"BUNDLE": self.bundle.name} if self.pin_bundle else {}),
            **self.env,
        }
        spec = ServiceSpec(
            "ranker",
            "services.ranker.server",
            "anime2vec.v1.RankerService",
            "127.0.0.1",
            grpc_port,
            metrics_port,
            env=settings,
        )
        self.proc = ServiceProcess(spec, self.root / "ranker.log")
        self._channel: grpc.Channel | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def address(self) -> str:
        return self.proc.spec.address

    def start(self, wait: bool = True) -> None:
        self.proc.start()
        if wait:
            self.proc.wait_serving(STARTUP_TIMEOUT_S)

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.proc.wait_serving(timeout_s)

    def kill9(self) -> None:
        """SIGKILL: no graceful shutdown, nothing flushed by the process itself."""
        if self.proc.alive():
            self.proc.proc.send_signal(signal.SIGKILL)
            self.proc.proc.wait(60)

    def stop(self) -> int | None:
        self.close_channel()
        return self.proc.stop()

    def stub(self) -> ranker_pb2_grpc.RankerServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return ranker_pb2_grpc.RankerServiceStub(self._channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def log_size(self) -> int:
        return self.proc.log_path.stat().st_size if self.proc.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        with open(self.proc.log_path, errors="replace") as f:
            f.seek(since)
            return f.read()

    def log_records(self, since: int = 0) -> list[dict]:
        """The JSON log lines written since byte offset `since`."""
        out = []
        for line in self.log_text(since).splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

"""End-to-end fixtures: a bundle trained once per test run with the real MiniLM encoder (shared by the
workers of a parallel run and by the fuzz, load and fault tests), and the encoder, ranker and gateway
as real processes on free loopback ports, started once per session.

Tests that stop a service leave it stopped; the `stack` fixture restarts whatever is down before
the next test, so tests do not depend on their order.

A2V_E2E_BUNDLE=<bundle dir> serves that bundle instead of training one (for iterating on the tests).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from anime2vec.bundle import list_bundles
from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV
from anime2vec.v1 import gateway_pb2_grpc
from tests.e2e.support import Stack, start_services

TRAIN_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def shared_bundle(tmp_path_factory) -> Path:
    """The sample bundle of this test run, trained through the CLI with the real MiniLM encoder by the
    first fixture that needs it, in any worker of a parallel run (they share their basetemp's parent):
    the others wait on a file lock and serve the same bundle (no test writes into it)."""
    if os.environ.get("A2V_E2E_BUNDLE"):
        return Path(os.environ["A2V_E2E_BUNDLE"]).resolve()
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "e2e-bundle"
    root.mkdir(exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        store = root / "models"
        if store.is_dir() and (found := list_bundles(store)):
            return found[0]
        return _train(root)


def _train(root: Path) -> Path:
    store, cache = root / "models", root / "cache"
    # only what the bundle serves (the hybrid, WMF as its fallback) and one baseline: the whole
    # comparison is tests/test_cli.py's job
    cmd = [
        sys.executable,
        "-m",
        "anime2vec.cli",
        "train",
        "--sample",
        "--quiet",
        "--models",
        "popularity,wmf,anime2vec-hybrid",
        "--store",
        str(store),
        "--report-dir",
        str(root / "report"),
    ]
    run = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=os.environ | OFFLINE_ENV | {"A2V_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert run.returncode == 0, f"training failed:\n{run.stderr[-4000:]}"
    (path,) = list_bundles(store)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def services(e2e_dir, bundle):
    procs = start_services(e2e_dir / "stack", bundle)
    channel = grpc.insecure_channel(procs["gateway"].spec.address)
    stack = Stack(procs, channel, gateway_pb2_grpc.GatewayServiceStub(channel), bundle)
    yield stack
    channel.close()
    for name in ("gateway", "ranker", "encoder"):
        procs[name].stop()


@pytest.fixture
def stack(services) -> Stack:
    services.ensure_running()
    return services

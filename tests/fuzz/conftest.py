"""The fuzz tests run against the end-to-end stack: the same fixtures as tests/e2e (re-exported
here, since a conftest only serves its own folder), except that the stack's first API key has every
scope, so AddAnime (scope `catalog`) is fuzzed too.

A session fixture defined in two conftests is two fixtures, so a full run starts a second stack for
these tests; the bundle is the run's one e2e bundle (tests/e2e/conftest.py shared_bundle).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from anime2vec.v1 import gateway_pb2_grpc
from tests.e2e import conftest as e2e
from tests.e2e.conftest import e2e_dir, stack  # noqa: F401  (fixtures, found by name)
from tests.e2e.support import API_KEYS, Stack, stack_processes
from tests.load.support import start_together, stop_all

# AUTH presents API_KEYS[0]; scopes are configuration, not part of the key presented.
GATEWAY_KEYS = f"{API_KEYS[0]}:read+feedback+catalog,{API_KEYS[1]}"


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return e2e.shared_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def services(e2e_dir, bundle):
    env = {"gateway": {"API_KEYS": GATEWAY_KEYS}}
    if json.loads((bundle / "manifest.json").read_text())["encoder"]["name"].startswith("tiny-random"):
        env["encoder"] = {"MODEL": "tiny-random"}  # a bundle given by A2V_E2E_BUNDLE for a quick run
    procs = stack_processes(e2e_dir / "fuzz-stack", bundle, env=env)
    start_together(procs)
    channel = grpc.insecure_channel(procs["gateway"].spec.address)
    yield Stack(procs, channel, gateway_pb2_grpc.GatewayServiceStub(channel), bundle)
    channel.close()
    stop_all(procs)

"""The encoder as operators run it: `python -m services.encoder.server` in its own process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from anime2vec.features.encoder import TextEncoder
from anime2vec.paths import REPO_ROOT
from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A2V_ENCODER_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        A2V_ENCODER_HOST="127.0.0.1",
        A2V_ENCODER_GRPC_PORT="0",
        A2V_ENCODER_METRICS_PORT="0",
        **extra,
    )
    return env


def _launch(env: dict) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.encoder.server"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, msg: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("msg") == msg:
            return entry
    raise AssertionError(f"no {msg!r} log line; stderr was:\n{''.join(seen)}")


@pytest.fixture
def encoder_process():
    proc, lines = _launch(_env(A2V_ENCODER_MODEL="tiny-random"))
    yield proc, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_serves_over_a_socket_and_exits_cleanly_on_sigterm(encoder_process):
    proc, lines = encoder_process
    loaded = _wait_for(lines, "model loaded")
    started = _wait_for(lines, "serving")
    channel = grpc.insecure_channel(f"127.0.0.1:{started['grpc_port']}")

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "anime2vec.v1.EncoderService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    assert "anime2vec.v1.EncoderService" in set(ProtoReflectionDescriptorDatabase(channel).get_services())

    stub = encoder_pb2_grpc.EncoderServiceStub(channel)
    resp = stub.Encode(encoder_pb2.EncodeRequest(texts=["A boy becomes a ninja.", "Alchemist brothers."]), timeout=30)
    assert resp.dim == 32 and resp.model_name.startswith("tiny-random") and len(resp.model_version) == 16
    # the precision chosen at start-up (A2V_ENCODER_PRECISION=auto) is the one the library chooses here
    info = stub.GetInfo(encoder_pb2.GetInfoRequest(), timeout=30)
    assert info.precision == TextEncoder.tiny_random(precision="auto").precision
    assert loaded["precision"] == info.precision
    vectors = np.array([v.values for v in resp.vectors])
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    body = urllib.request.urlopen(f"http://127.0.0.1:{started['metrics_port']}/metrics", timeout=30).read().decode()
    assert "a2v_encoder_batch_size_count 1.0" in body
    assert "a2v_encoder_batch_size_sum 2.0" in body
    assert 'a2v_rpc_requests_total{code="OK",method="anime2vec.v1.EncoderService/Encode",service="encoder"} 1.0' in body
    channel.close()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    _wait_for(lines, "stopped", timeout=10)


def test_a_sigterm_while_starting_stops_it_gracefully_once_it_serves(encoder_process):
    """A stop signal sent as the model has loaded, before the server serves (a pod stopped as it
    starts): taken only once the server waited for it, it killed the process (exit -15)."""
    proc, lines = encoder_process
    _wait_for(lines, "model loaded")
    proc.send_signal(signal.SIGTERM)
    _wait_for(lines, "serving", timeout=60)  # it finishes starting ...
    stopping = _wait_for(lines, "received SIGTERM, shutting down", timeout=60)  # ... then stops in order
    assert proc.wait(60) == 0 and stopping["level"] == "INFO"
    _wait_for(lines, "stopped", timeout=10)


def test_invalid_configuration_exits_2_naming_the_variable():
    proc, lines = _launch(_env(A2V_ENCODER_MODEL="gpt-9", A2V_ENCODER_MAX_WAIT_MS="-1"))
    assert proc.wait(120) == 2
    err = "".join(iter(lines.get, None))
    assert "A2V_ENCODER_MODEL" in err and "A2V_ENCODER_MAX_WAIT_MS" in err

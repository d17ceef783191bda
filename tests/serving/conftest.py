"""Fixtures: the probe service served by `build_server` on free ports."""

from __future__ import annotations

import grpc
import pytest

from anime2vec.serving.server import build_server
from tests.serving.probe_service import PROBE, Probe, add_probe, settings


@pytest.fixture
def probe():
    return Probe()


@pytest.fixture
def serve(probe):
    """serve(**settings) → (RunningServer, channel); everything is stopped at teardown."""
    started = []

    def start(on_stop=(), interceptors=(), **kw):
        running = build_server(
            settings(**kw), "probe", add_probe(probe), [PROBE], on_stop=on_stop, interceptors=interceptors
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, channel

    yield start
    probe.release.set()
    for running, channel in started:
        channel.close()
        running.stop()

"""The encoder service in process, over a real socket: vectors, limits and precise statuses."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from anime2vec.features.encoder import TextEncoder
from anime2vec.serving.errors import ErrorDetails
from anime2vec.serving.settings import SettingsError
from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc
from services.encoder.server import start
from services.encoder.settings import EncoderSettings


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return TextEncoder.tiny_random(seed=0, device="cpu")


def _settings(**kw) -> EncoderSettings:
    return EncoderSettings.from_env(
        **{
            "host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "model": "tiny-random",
            "max_texts_per_request": 8,
            "max_chars_per_text": 1000,
            **kw,
        }
    )


@pytest.fixture
def serve():
    started = []

    def run(encoder, **kw):
        running = start(_settings(**kw), encoder)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, encoder_pb2_grpc.EncoderServiceStub(channel), channel

    yield run
    for running, channel in started:
        channel.close()
        running.stop()


def error_of(call, *args) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as ei:
        call(*args, timeout=30)
    return ErrorDetails.from_rpc_error(ei.value)


def test_encode_returns_the_encoders_vectors_in_order(serve, tiny):
    _, stub, _ = serve(tiny)
    texts = ["A boy becomes a ninja.", "Two alchemist brothers.", "Baking bread in a quiet town."]
    resp = stub.Encode(encoder_pb2.EncodeRequest(texts=texts), timeout=30)
    got = np.array([v.values for v in resp.vectors], dtype=np.float32)
    np.testing.assert_allclose(got, tiny.encode(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (resp.model_name, resp.model_version, resp.dim) == (tiny.name, tiny.fingerprint, tiny.dim)
    # no deadline at all is legal too
    assert stub.Encode(encoder_pb2.EncodeRequest(texts=texts[:1])).vectors[0] == resp.vectors[0]
    info = stub.GetInfo(encoder_pb2.GetInfoRequest(), timeout=30)
    assert (info.model_version, info.dim, info.device, info.max_texts_per_request, info.max_chars_per_text) == (
        tiny.fingerprint,
        32,
        "cpu",
        8,
        1000,
    )


def test_concurrent_callers_each_get_their_own_vectors(serve, tiny):
    running, stub, _ = serve(tiny, max_wait_ms=20)
    texts = [f"story number {i} about {'robots' if i % 2 else 'cooking'}" for i in range(16)]
    want = tiny.encode(texts)
    results: dict[int, np.ndarray] = {}

    def one(i):
        resp = stub.Encode(encoder_pb2.EncodeRequest(texts=[texts[i]]), timeout=30)
        results[i] = np.array(resp.vectors[0].values, dtype=np.float32)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(16):
        np.testing.assert_allclose(results[i], want[i], atol=1e-5)
    get = running.metrics.registry.get_sample_value
    assert get("a2v_encoder_batch_size_sum") == 16
    assert (
        get("a2v_model_info", {"service": "encoder", "version": tiny.fingerprint, "encoder": tiny.name, "dim": "32"})
        == 1
    )


def test_bad_input_gets_precise_statuses(serve, tiny):
    _, stub, channel = serve(tiny)
    d = error_of(stub.Encode, encoder_pb2.EncodeRequest())
    assert (d.code, d.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"texts": "at least one text is required"},
    )

    d = error_of(stub.Encode, encoder_pb2.EncodeRequest(texts=["x"] * 9))
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.field_violations == {
        "texts": "9 texts; at most 8 per request"
    }

    d = error_of(stub.Encode, encoder_pb2.EncodeRequest(texts=["ok", " \n", "fine", "y" * 1001]))
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.field_violations == {"texts[1]": "blank text", "texts[3]": "1001 characters; at most 1000"}

    # 10 MB is over the 4 MiB message limit: grpc refuses it before the handler runs
    d = error_of(stub.Encode, encoder_pb2.EncodeRequest(texts=["z" * 10_000_000]))
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Python clients cannot build a str field with invalid UTF-8; raw bytes can
    raw = channel.unary_unary("/anime2vec.v1.EncoderService/Encode")
    with pytest.raises(grpc.RpcError) as ei:
        raw(b"\x0a\x03ok!\x0a\x02\xc3\x28", timeout=30)
    d = ErrorDetails.from_rpc_error(ei.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in d.field_violations["request"]


class BlockedEncoder:
    """Looks like a TextEncoder; its encode blocks until released."""

    name, fingerprint, dim, device, max_length = "blocked", "f00", 2, "cpu", 16

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        self.started.set()
        assert self.release.wait(30)
        return np.ones((len(texts), 2), np.float32) / np.sqrt(2)


def test_full_queue_is_resource_exhausted_with_retry_info(serve):
    enc = BlockedEncoder()
    running, stub, _ = serve(enc, max_queue_texts=8, max_texts_per_request=8)
    first = stub.Encode.future(encoder_pb2.EncodeRequest(texts=["a"]), timeout=30)
    assert enc.started.wait(10)
    queued = stub.Encode.future(encoder_pb2.EncodeRequest(texts=["b"] * 7), timeout=30)
    deadline = time.monotonic() + 10
    while running.metrics.registry.get_sample_value("a2v_encoder_queue_depth") != 7:
        assert time.monotonic() < deadline, "the 7 texts never reached the queue"
        time.sleep(0.01)
    d = error_of(stub.Encode, encoder_pb2.EncodeRequest(texts=["c", "d"]))
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.reason == "ENCODER_QUEUE_FULL" and d.retry_after_s == pytest.approx(0.05)
    enc.release.set()
    assert len(first.result().vectors) == 1 and len(queued.result().vectors) == 7


def test_a_caller_whose_deadline_passes_is_dropped_from_the_queue(serve):
    enc = BlockedEncoder()
    running, stub, _ = serve(enc)
    first = stub.Encode.future(encoder_pb2.EncodeRequest(texts=["first"]), timeout=30)
    assert enc.started.wait(10)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Encode(encoder_pb2.EncodeRequest(texts=["late"]), timeout=0.2)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def ended(code: str) -> float:
        labels = {"service": "encoder", "method": "anime2vec.v1.EncoderService/Encode", "code": code}
        return running.metrics.registry.get_sample_value("a2v_rpc_requests_total", labels) or 0.0

    # The server sees either its own deadline or the client's cancellation first; both drop the text.
    deadline = time.monotonic() + 10
    while ended("DEADLINE_EXCEEDED") + ended("CANCELLED") != 1:
        assert time.monotonic() < deadline, "the server never finished the expired call"
        time.sleep(0.01)
    enc.release.set()
    assert len(first.result().vectors) == 1
    assert len(stub.Encode(encoder_pb2.EncodeRequest(texts=["next"]), timeout=30).vectors) == 1
    assert enc.calls == [["first"], ["next"]]  # "late" was never encoded


def test_settings_refuse_a_request_limit_the_queue_cannot_hold():
    with pytest.raises(SettingsError, match="max_texts_per_request .* exceeds max_queue_texts"):
        _settings(max_texts_per_request=100, max_queue_texts=10)

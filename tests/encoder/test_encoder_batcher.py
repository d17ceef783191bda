"""MicroBatcher: concurrent requests share model calls and each caller gets its own rows."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from anime2vec.serving.metrics import create_metrics
from services.encoder.batcher import BatcherClosed, MicroBatcher, QueueFull


class FakeEncoder:
    """Encodes "r{i}-t{j}" as [i, j]; records each call; the first call can be held open so
    later requests pile up in the queue."""

    def __init__(self, hold_first: bool = False, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        if not hold_first:
            self.release_first.set()
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.first_started.set()
            assert self.release_first.wait(30)
        if self.fail_on in texts:
            raise RuntimeError("model exploded")
        return np.array([[float(t.split("-")[0][1:]), float(t.split("-")[1][1:])] for t in texts], dtype=np.float32)


def texts_for(i: int, n: int) -> list[str]:
    return [f"r{i}-t{j}" for j in range(n)]


def expected(i: int, n: int) -> np.ndarray:
    return np.array([[i, j] for j in range(n)], dtype=np.float32)


@pytest.fixture
def make():
    made = []

    def build(encoder, **kw):
        b = MicroBatcher(encoder, **{"max_batch_texts": 64, "max_wait_s": 0.02, "max_queue_texts": 1000, **kw})
        made.append(b)
        return b

    yield build
    for b in made:
        b.close(10)


def test_concurrent_requests_become_fewer_calls_with_results_in_order(make):
    enc = FakeEncoder(hold_first=True)
    metrics = create_metrics()
    b = make(enc, metrics=metrics)
    first = b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)
    # 12 callers on 12 threads while the model is busy with the first call
    futures: dict[int, Future] = {}
    threads = [
        threading.Thread(target=lambda i=i: futures.__setitem__(i, b.submit(texts_for(i, i % 3 + 1))))
        for i in range(1, 13)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert metrics.registry.get_sample_value("a2v_encoder_queue_depth") == sum(i % 3 + 1 for i in range(1, 13))
    enc.release_first.set()
    np.testing.assert_array_equal(first.result(10), expected(0, 1))
    for i, fut in futures.items():
        np.testing.assert_array_equal(fut.result(10), expected(i, i % 3 + 1))
    # the 12 queued requests (24 texts <= 64) went to the model together
    assert len(enc.calls) == 2 and len(enc.calls[1]) == 24
    get = metrics.registry.get_sample_value
    assert get("a2v_encoder_batch_size_count") == 2 and get("a2v_encoder_batch_size_sum") == 25
    assert get("a2v_encoder_queue_wait_seconds_count") == 13
    assert get("a2v_encoder_queue_depth") == 0


def test_batches_never_exceed_the_limit_and_requests_are_not_split(make):
    enc = FakeEncoder(hold_first=True)
    b = make(enc, max_batch_texts=5)
    b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)
    sizes = [3, 2, 4, 1, 7, 2]  # 7 > the limit: it goes alone
    futs = [b.submit(texts_for(i, n)) for i, n in enumerate(sizes, start=1)]
    enc.release_first.set()
    for i, (n, fut) in enumerate(zip(sizes, futs), start=1):
        np.testing.assert_array_equal(fut.result(10), expected(i, n))
    batches = [[t.split("-")[0] for t in call] for call in enc.calls[1:]]
    # whole requests in arrival order: [3+2], [4+1], [7], [2]
    assert [len(c) for c in batches] == [5, 5, 7, 2]
    assert [sorted(set(c), key=c.index) for c in batches] == [["r1", "r2"], ["r3", "r4"], ["r5"], ["r6"]]


def test_a_lone_request_is_served_after_the_wait(make):
    enc = FakeEncoder()
    b = make(enc, max_wait_s=0.01)
    np.testing.assert_array_equal(b.submit(texts_for(4, 2)).result(10), expected(4, 2))
    assert enc.calls == [texts_for(4, 2)]


def test_full_queue_is_refused_at_once(make):
    enc = FakeEncoder(hold_first=True)
    b = make(enc, max_queue_texts=10)
    b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)  # taken by the worker: the queue is empty again
    kept = b.submit(texts_for(1, 8))
    with pytest.raises(QueueFull):
        b.submit(texts_for(2, 3))  # 8 + 3 > 10
    fits = b.submit(texts_for(3, 2))  # 8 + 2 = 10
    enc.release_first.set()
    np.testing.assert_array_equal(kept.result(10), expected(1, 8))
    np.testing.assert_array_equal(fits.result(10), expected(3, 2))


def test_a_failed_call_fails_its_requests_and_the_worker_survives(make):
    enc = FakeEncoder(hold_first=True, fail_on="r2-t0")
    b = make(enc)
    b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)
    doomed = [b.submit(texts_for(1, 1)), b.submit(texts_for(2, 1))]
    enc.release_first.set()
    for fut in doomed:  # same batch as the failing text
        with pytest.raises(RuntimeError, match="model exploded"):
            fut.result(10)
    np.testing.assert_array_equal(b.submit(texts_for(3, 1)).result(10), expected(3, 1))


def test_cancelled_requests_are_not_encoded(make):
    enc = FakeEncoder(hold_first=True)
    b = make(enc)
    b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)
    gone, stays = b.submit(texts_for(1, 2)), b.submit(texts_for(2, 1))
    assert gone.cancel()
    enc.release_first.set()
    np.testing.assert_array_equal(stays.result(10), expected(2, 1))
    assert enc.calls[1] == texts_for(2, 1)


def test_close_finishes_queued_work_then_refuses(make):
    enc = FakeEncoder(hold_first=True)
    b = make(enc)
    b.submit(texts_for(0, 1))
    assert enc.first_started.wait(10)
    queued = b.submit(texts_for(1, 2))
    closer = threading.Thread(target=b.close, args=(10,))
    closer.start()
    enc.release_first.set()
    closer.join(10)
    np.testing.assert_array_equal(queued.result(0), expected(1, 2))
    with pytest.raises(BatcherClosed):
        b.submit(texts_for(2, 1))


def test_empty_submit_is_a_programming_error(make):
    with pytest.raises(ValueError):
        make(FakeEncoder()).submit([])

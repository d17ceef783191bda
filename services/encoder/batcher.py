"""Dynamic micro-batching: concurrent encode requests share one model call.

A transformer call costs about the same for 1 text as for 16 (on a GPU, for far more), so one
worker thread gathers whole requests until the batch holds `max_batch_texts` texts or
`max_wait_s` has passed since the oldest request arrived, encodes them in one call and completes
each request's future with its own rows. The queue is bounded in texts: a full queue is refused at
once (`QueueFull`) instead of letting latency grow without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from anime2vec.serving.metrics import Metrics

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


class QueueFull(Exception):
    """The batching queue has no room for the request's texts."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Request:
    texts: list[str]
    future: Future
    enqueued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """`submit(texts)` → Future of an (len(texts), dim) array. Thread-safe."""

    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch_texts: int,
        max_wait_s: float,
        max_queue_texts: int,
        metrics: Metrics | None = None,
    ):
        if max_batch_texts < 1 or max_queue_texts < 1 or max_wait_s < 0:
            raise ValueError("max_batch_texts and max_queue_texts must be >= 1 and max_wait_s >= 0")
        self._encode = encode
        self.max_batch_texts, self.max_wait_s, self.max_queue_texts = max_batch_texts, max_wait_s, max_queue_texts
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._queued_texts = 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="encoder-batcher", daemon=True)
        self._worker.start()

    def submit(self, texts: Sequence[str]) -> Future:
        texts = list(texts)
        if not texts:
            raise ValueError("submit needs at least one text")
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the encoder is shutting down")
            if self._queued_texts + len(texts) > self.max_queue_texts:
                raise QueueFull(f"{self._queued_texts} texts already queued (limit {self.max_queue_texts})")
            self._queue.append(_Request(texts, fut))
            self._queued_texts += len(texts)
            self._set_depth()
            self._cond.notify()
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.encoder_queue_depth.set(self._queued_texts)

    def _next_batch(self) -> list[_Request] | None:
        """Block for the first request, then gather more until the batch is full or the oldest
        request has waited max_wait_s. None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            n_texts = len(batch[0].texts)
            deadline = batch[0].enqueued_at + self.max_wait_s
            while n_texts < self.max_batch_texts:
                if self._queue:
                    # Whole requests only; one that would overflow waits for the next batch.
                    if n_texts + len(self._queue[0].texts) > self.max_batch_texts:
                        break
                    req = self._queue.popleft()
                    batch.append(req)
                    n_texts += len(req.texts)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._queued_texts -= n_texts
            self._set_depth()
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.monotonic()
            # A request whose caller gave up (its future was cancelled) is not encoded.
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            texts = [t for r in live for t in r.texts]
            if self._metrics is not None:
                self._metrics.encoder_batch_size.observe(len(texts))
                for r in live:
                    self._metrics.encoder_queue_wait.observe(started - r.enqueued_at)
            try:
                vectors = self._encode(texts)
                if len(vectors) != len(texts):
                    raise RuntimeError(f"encoder returned {len(vectors)} vectors for {len(texts)} texts")
            except Exception as e:  # the callers' handlers report it; the worker must survive
                log.exception("encoder call failed for a batch of %d texts", len(texts))
                for r in live:
                    r.future.set_exception(e)
                continue
            start = 0
            for r in live:
                r.future.set_result(vectors[start : start + len(r.texts)])
                start += len(r.texts)

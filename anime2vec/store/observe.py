"""How the stores report each operation (latency, outcome) without knowing about Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# observe(store, operation, seconds, outcome): store "feedback" | "added_anime"; outcome "ok",
# "unavailable" (the database could not be reached), "retried" (a deadlock or serialization
# failure, tried again) or "error" (anything else: the call failed)
Observer = Callable[[str, str, float, str], None]


def _ignore(store: str, operation: str, seconds: float, outcome: str) -> None:
    pass


def metrics_observer(metrics, backend: str) -> Observer:
    """An Observer feeding anime2vec.serving.metrics' a2v_store_* metrics."""

    def observe(store: str, operation: str, seconds: float, outcome: str) -> None:
        metrics.store_operation.labels(backend=backend, store=store, operation=operation).observe(seconds)
        if outcome != "ok":
            metrics.store_errors.labels(backend=backend, store=store, operation=operation, kind=outcome).inc()

    return observe


@contextmanager
def timed(
    observe: Observer | None, store: str, operation: str, classify: Callable[[BaseException], str]
) -> Iterator[None]:
    """Report one operation's duration and outcome (failed ones too: a timeout is latency as well)."""
    start = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as e:
        # a ValueError is the caller's input refused (an event id reused, a bad field): the store worked
        outcome = "ok" if isinstance(e, ValueError) else classify(e)
        raise
    finally:
        (observe or _ignore)(store, operation, time.perf_counter() - start, outcome)

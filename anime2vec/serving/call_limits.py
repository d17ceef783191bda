"""Bounds on what one call may hold, whatever its caller does (the server's side of a stalled client).

grpc's synchronous server gives every admitted call a thread that first waits for the request
message, and counts the call against `maximum_concurrent_rpcs` meanwhile. A caller that sends its
headers and never its message, without a deadline, would hold both forever. So:

- the request message must arrive within `request_timeout_s` of the call's start; otherwise the
  call is ended with DEADLINE_EXCEEDED and its thread and slot are free again;
- every call has a deadline: the caller's, capped at `max_call_s`. Handlers see it through
  `context.time_remaining()` (so downstream calls are bounded by it), and a call still running at
  its server-side deadline is ended with DEADLINE_EXCEEDED;
- at most `max_workers` handlers run at once; an admitted call waits for a worker (within its
  deadline) only after its message arrived, so callers that stall never take a worker.

One `Watchdog` thread per server ends the calls that overstay.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from .errors import ServiceError

log = logging.getLogger("anime2vec.serving")


class Alarm:
    __slots__ = ("action", "cancelled", "_watchdog")

    def __init__(self, action: Callable[[], None], watchdog: Watchdog):
        self.action, self.cancelled, self._watchdog = action, False, watchdog

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._watchdog._cancelled += 1  # approximate (no lock): it only decides when to compact


class Watchdog:
    """Runs each scheduled action at its due time (time.monotonic) unless cancelled first; one
    daemon thread for all of a server's calls, started on first use. Most alarms are cancelled
    (the message came, the call ended in time): the heap is compacted when they are the majority,
    so it holds about as many entries as there are calls in progress."""

    _COMPACT_AT = 1024

    def __init__(self, name: str):
        self.name = name
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._cancelled = 0

    def schedule(self, due: float, action: Callable[[], None]) -> Alarm:
        alarm = Alarm(action, self)
        with self._cv:
            if self._cancelled > self._COMPACT_AT and self._cancelled * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0
            heapq.heappush(self._heap, (due, next(self._order), alarm))
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return alarm

    def pending(self) -> int:
        """Alarms scheduled and neither run nor cancelled (for tests)."""
        with self._cv:
            return sum(not entry[2].cancelled for entry in self._heap)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                _, _, alarm = heapq.heappop(self._heap)
                if alarm.cancelled:
                    self._cancelled -= 1
                    continue
            try:
                alarm.action()
            except Exception:  # one call's trouble must not stop the watchdog
                log.exception("watchdog action failed")


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from another thread with `code` and `message`. grpc's public `cancel()` can only
    say CANCELLED, which would tell the caller it cancelled; the call object underneath takes a
    status (grpc_call_cancel_with_status), which is what the caller should see."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        if call is not None:
            call.cancel(code.value[0], message)
            return
    except Exception:  # a grpc without that call object: fall back to the public API
        pass
    context.cancel()


class BoundedContext:
    """The servicer context handlers get: grpc's own, whose deadline is capped at the server's."""

    def __init__(self, context: grpc.ServicerContext, deadline: float):
        self._context, self._deadline = context, deadline

    def time_remaining(self) -> float:
        return max(0.0, min(self._context.time_remaining(), self._deadline - time.monotonic()))

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class CallEnded(Exception):
    """The call is over before its handler ran (the caller left, or the watchdog ended it): there is
    nothing left to answer. `error` is grpc's own RpcError, which must be re-raised as is (grpc
    knows it and logs nothing); None when grpc reported the end as a closed request stream."""

    def __init__(self, code: grpc.StatusCode, error: grpc.RpcError | None):
        super().__init__(code.name)
        self.code, self.error = code, error


class CallLimits:
    """A server's bounds (see the module docstring); `start(context)` begins one call's watch."""

    def __init__(self, service: str, request_timeout_s: float, max_call_s: float, max_workers: int):
        self.request_timeout_s, self.max_call_s = request_timeout_s, max_call_s
        self.watchdog = Watchdog(f"{service}-watchdog")
        self._workers = threading.BoundedSemaphore(max_workers)

    def start(self, context: grpc.ServicerContext, cap: bool = True) -> GuardedCall:
        """Watch one call; `cap`: give it the server's deadline (unary calls; not streams such as
        health Watch, which legitimately last)."""
        return GuardedCall(self, context, cap)

    @contextmanager
    def worker(self, call: GuardedCall):
        """Hold one of the max_workers handler slots; DEADLINE_EXCEEDED when none frees up in time."""
        if not self._workers.acquire(timeout=call.context.time_remaining()):
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the server was busy until this call's deadline")
        try:
            yield
        finally:
            self._workers.release()

    def stop(self) -> None:
        self.watchdog.stop()


class GuardedCall:
    """One call under watch: its messages must come within request_timeout_s each, and a unary call
    is ended at its (server-capped) deadline. `ended` is the status the watchdog ended it with, if any."""

    def __init__(self, limits: CallLimits, context: grpc.ServicerContext, cap: bool = True):
        self._limits, self._raw = limits, context
        remaining = context.time_remaining()
        self.capped = cap and remaining > limits.max_call_s
        self.deadline = time.monotonic() + (min(remaining, limits.max_call_s) if cap else remaining)
        self.context = BoundedContext(context, self.deadline)
        self.ended: grpc.StatusCode | None = None
        self._alarm: Alarm | None = None

    def _end(self, message: str) -> None:
        self.ended = grpc.StatusCode.DEADLINE_EXCEEDED
        end_call(self._raw, grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def receive(self, requests: Iterator):
        """The call's next request message, waiting at most request_timeout_s (and never past the
        deadline). StopIteration when the caller sent none; CallEnded when the call is over."""
        limit = self._limits.request_timeout_s
        due = min(time.monotonic() + limit, self.deadline)
        alarm = self._limits.watchdog.schedule(due, lambda: self._end(f"no request message within {limit:g} s"))
        try:
            return next(requests)
        except grpc.RpcError as e:  # grpc's own signal that the call was cancelled meanwhile
            raise CallEnded(self.ended or grpc.StatusCode.CANCELLED, e) from None
        except StopIteration:
            if self.ended is not None:  # ended by the watchdog, which grpc may report as a closed stream
                raise CallEnded(self.ended, None) from None
            raise
        finally:
            alarm.cancel()

    def watch_deadline(self) -> None:
        """End the call at its server-side deadline when the caller's own is later or absent (grpc
        ends calls at the caller's deadline by itself)."""
        if self.capped:
            self._alarm = self._limits.watchdog.schedule(
                self.deadline,
                lambda: self._end(f"the call ran past the server's limit of {self._limits.max_call_s:g} s per call"),
            )

    def finish(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()


class BoundedRequests:
    """A request stream whose every message must arrive within request_timeout_s (streaming calls:
    reflection); a late one ends the call as GuardedCall.receive does."""

    def __init__(self, requests: Iterator, call: GuardedCall):
        self._requests, self._call = requests, call

    def __iter__(self) -> BoundedRequests:
        return self

    def __next__(self):
        try:
            return self._call.receive(self._requests)
        except CallEnded as e:
            if e.error is None:
                raise StopIteration from None
            raise e.error from None

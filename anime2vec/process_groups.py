"""Child processes that stop together with everything they started, on SIGINT and SIGTERM.

Each child runs in its own session, so in its own process group: a terminal's Ctrl-C reaches only
the parent, which decides the order of shutdown, and stopping a child signals its whole group, so
what it started (a training step's workers, the ranker's shard checks) goes with it.

`raise_on_signals()` turns SIGINT and SIGTERM into KeyboardInterrupt in the main thread, except
while a child is being started and recorded (`spawn`) or while children are being stopped
(`stopping()`): a signal then is kept for later, so no child is ever started without its parent
knowing its pid, and a stop is never cut short (a second signal during it means "hurry": the
children get SIGKILL at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _State:
    deferring: int = 0  # nesting depth of sections where a signal must not raise
    pending: int | None = None  # a signal that arrived while deferring
    received: int | None = None  # the first stop signal, for the exit status
    hurry: bool = False  # a second signal while stopping


_state = _State()


def _on_signal(signum, frame) -> None:
    if _state.received is not None and _state.deferring:
        _state.hurry = True
    _state.received = _state.received or signum
    if _state.deferring:
        _state.pending = signum
        return
    raise KeyboardInterrupt


def raise_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (also when the process was started with SIGINT
    ignored, as `make run &` does)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def received_signal() -> int | None:
    """The first SIGINT or SIGTERM received, if any."""
    return _state.received


def hurry() -> bool:
    """True once a second stop signal arrived while stopping."""
    return _state.hurry


@contextmanager
def _deferred(raise_after: bool) -> Iterator[None]:
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending is not None:
            _state.pending = None
            if raise_after:
                raise KeyboardInterrupt


@contextmanager
def stopping() -> Iterator[None]:
    """Stop children inside this: signals no longer interrupt the stop, a second one hurries it."""
    with _deferred(raise_after=False):
        yield


def spawn(
    cmd: Sequence[str], started: Callable[[subprocess.Popen], None] = lambda proc: None, **popen_kwargs
) -> subprocess.Popen:
    """Popen in a new session; `started(proc)` records it. A stop signal that arrives meanwhile
    is raised (KeyboardInterrupt) only after `started` ran, so the caller can always stop it."""
    with _deferred(raise_after=True):
        proc = subprocess.Popen(list(cmd), start_new_session=True, **popen_kwargs)
        started(proc)
    return proc


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone (PermissionError: macOS reports a group of zombies this way)


def stop_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> int | None:
    """SIGTERM to the child's process group; SIGKILL to the group when the child has not exited
    within timeout_s (at once after a second stop signal); then SIGKILL to whatever is left in the
    group, so nothing it started outlives it. Returns the child's exit status."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline and not hurry():
            try:
                proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
    _signal_group(pgid, signal.SIGKILL)  # stragglers that ignored SIGTERM or outlived the leader
    return proc.returncode


def run_to_completion(cmd: Sequence[str], *, stop_timeout_s: float = 10.0, **popen_kwargs) -> int:
    """Run a step (e.g. training) as a child in its own group and return its exit status; an
    interrupt meanwhile stops the whole group before it propagates."""
    procs: list[subprocess.Popen] = []
    try:
        return spawn(cmd, procs.append, **popen_kwargs).wait()
    except BaseException:
        with stopping():
            for proc in procs:
                stop_group(proc, stop_timeout_s)
        raise

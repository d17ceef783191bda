"""Processes as the kernel sees them (/proc), for tests that must prove nothing was left running,
and a child's output read in the background."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    state: str
    cmdline: str


def processes() -> dict[int, Proc]:
    """Every process of this machine (this container), from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        out[int(d.name)] = Proc(int(d.name), int(fields[1]), int(fields[3]), fields[0], cmdline)
    return out


def descendants(root: int) -> list[Proc]:
    procs = processes()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p in procs.values() if p.ppid == parent]
        found += children
        frontier += [c.pid for c in children]
    return found


def still_running(pids: set[int], sessions: set[int]) -> list[Proc]:
    """Processes among `pids` or in one of `sessions` that have not exited (zombies have)."""
    return [p for p in processes().values() if (p.pid in pids or p.session in sessions) and p.state != "Z"]


class Output:
    """A child's stdout read line by line in the background."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self._thread.start()

    def wait_for(self, predicate, timeout_s: float, proc: subprocess.Popen) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if predicate(self.lines):
                return True
            time.sleep(0.2)
        return predicate(self.lines)

    def text(self) -> str:
        return "".join(self.lines)


def _ports_free(ports) -> bool:
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port_runs(n: int = 3) -> tuple[int, int]:
    """Two bases, each with n consecutive free ports (gRPC, metrics)."""
    bases = []
    for base in range(21000 + os.getpid() % 2000 * 10, 65000, 10):
        if _ports_free(range(base, base + n)):
            bases.append(base)
            if len(bases) == 2:
                return bases[0], bases[1]
    raise RuntimeError("no free port range")


def runlocal_argv(store: Path, state: Path, *args: str) -> list[str]:
    """`python -m anime2vec.runlocal --sample` (what `make run SAMPLE=1` starts) on a model store and
    state directory of the test's own, with `args` after them."""
    import sys

    return [
        sys.executable,
        "-m",
        "anime2vec.runlocal",
        "--sample",
        "--store",
        str(store),
        "--state-dir",
        str(state),
        *args,
    ]


def start_runlocal(store: Path, state: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """runlocal_argv started from the repository, its output (stdout and stderr) piped as text."""
    from anime2vec.paths import REPO_ROOT

    return subprocess.Popen(
        runlocal_argv(store, state, *args),
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

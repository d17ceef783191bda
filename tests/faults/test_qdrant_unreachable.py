"""A ranker configured for a Qdrant server it cannot use: a closed port, and a port that accepts
TCP connections but never answers. It must neither hang nor die with a traceback: it exits with
status 1 and one log line that names the URL (under Kubernetes it is restarted with back-off and
its readiness probe never sends it traffic). The two rankers start side by side; the subprocess
timeout only guards against a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV
from tests.e2e.support import free_ports

pytestmark = pytest.mark.faults

HANG_GUARD_S = 120


def launch_ranker(root, url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("A2V_RANKER_", "QDRANT_"))}
    grpc_port, metrics_port = free_ports(2)
    env |= OFFLINE_ENV | {
        "A2V_RANKER_QDRANT_URL": url,
        "A2V_RANKER_HOST": "127.0.0.1",
        "A2V_RANKER_GRPC_PORT": str(grpc_port),
        "A2V_RANKER_METRICS_PORT": str(metrics_port),
        "A2V_RANKER_MODEL_STORE": str(root / "models"),
        "A2V_RANKER_DATA_DIR": str(root / "data"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.ranker.server"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def exits(tmp_path_factory):
    """{case: (url, exit status, output)} for a closed port and a silent one."""
    root = tmp_path_factory.mktemp("qdrant-unreachable")
    (closed,) = free_ports(1)  # nothing listens there
    with socket.socket() as sink:  # the kernel completes the handshakes; nobody ever reads or replies
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)
        urls = {"closed": f"http://127.0.0.1:{closed}", "silent": f"http://127.0.0.1:{sink.getsockname()[1]}"}
        procs = {case: launch_ranker(root / case, url) for case, url in urls.items()}
        out = {}
        try:
            for case, p in procs.items():
                text, _ = p.communicate(timeout=HANG_GUARD_S)
                out[case] = (urls[case], p.returncode, text)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return out


@pytest.mark.parametrize("case", ["closed", "silent"])
def test_an_unusable_qdrant_server_is_a_clear_start_up_error(exits, case):
    url, status, out = exits[case]
    assert status == 1, f"exit status {status}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and url in lines[0] and "Qdrant" in lines[0], out[-3000:]
    print(f"\n{case}: {lines[0]}")

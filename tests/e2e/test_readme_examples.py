"""The README as executable documentation: every command of its Quick start and API sections, pasted
after `make run`, works.

A real `make run` runner (python -m anime2vec.runlocal --sample) serves the e2e sample bundle on free
ports with its state directory at <checkout>/var/run, where <checkout> is a scratch directory laid
out like the repository (.venv, var/run/api-key, the MAL export the examples name). The fenced sh
blocks of the sections below are read in order, as one terminal would paste them: `export` lines
are kept as the prelude of every command after them, `make` lines are what started the runner, and
every client command runs in bash from <checkout>, with the README's loopback ports (50050-50052,
also the client's default address) swapped for the runner's.
Any other line fails the test, so a new kind of example cannot go untested. The lines the runner
prints under "Try it" are run the same way. Finally Ctrl-C to the runner stops every process it
started.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV, ranker_processes_from_env
from tests.e2e.test_api import MAL_XML
from tests.processes import Output, descendants, free_port_runs, start_runlocal, still_running

SECTIONS = ("Quick start", "`make run`", "The command-line client", "Any RPC as JSON: `client call` (or grpcurl)")
CLIENT = ".venv/bin/python -m anime2vec.client"
MAL_EXPORT = "animelist_1700000000_-_123456.xml.gz"
README_PORTS = (50050, 50051, 50052)
STARTUP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Example:
    section: str
    prelude: tuple[str, ...]  # the export lines before it, in README order
    command: str


def sections(text: str) -> dict[str, str]:
    """Heading text → its body (up to the next heading of the same or a higher level)."""
    heads = [(m.start(), len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{2,3}) (.+)$", text, re.M)]
    out = {}
    for i, (start, level, title) in enumerate(heads):
        end = next((s for s, lv, _ in heads[i + 1 :] if lv <= level), len(text))
        out[title] = text[start:end]
    return out


def shell_lines(body: str) -> list[str]:
    """The commands of a section's ```sh blocks: comments dropped, continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"^```(?:sh|bash|console)\n(.*?)^```", body, re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def examples(readme: str) -> list[Example]:
    found = sections(readme)
    missing = [t for t in SECTIONS if t not in found]
    assert not missing, f"README sections renamed or gone (update SECTIONS): {missing}"
    out: list[Example] = []
    prelude: list[str] = []
    for title in SECTIONS:
        for line in shell_lines(found[title]):
            if line.startswith("export "):
                prelude.append(line)
            elif line.startswith("make "):
                continue  # how the stack under test was started
            elif line.startswith(CLIENT + " "):
                out.append(Example(title, tuple(prelude), line))
            else:
                raise AssertionError(f"README {title!r}: no rule for running {line!r} (add one to this test)")
    return out


@dataclass
class Runner:
    proc: subprocess.Popen
    output: Output
    checkout: Path
    grpc_base: int

    def localise(self, command: str) -> str:
        """The README's loopback ports swapped for this runner's."""
        for i, port in enumerate(README_PORTS):
            command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.grpc_base + i}")
        return command

    def run(self, prelude, command: str) -> subprocess.CompletedProcess:
        script = "set -euo pipefail\n" + "\n".join(self.localise(c) for c in (*prelude, command))
        env = {k: v for k, v in os.environ.items() if not k.startswith("A2V_")}  # only what the README sets
        default_address = {"A2V_GATEWAY_ADDRESS": self.localise("127.0.0.1:50050")}  # the client's default
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.checkout,
            env=env | OFFLINE_ENV | default_address,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def runner(tmp_path_factory, bundle):
    """`make run SAMPLE=1`'s runner serving the e2e bundle, in a scratch checkout."""
    checkout = tmp_path_factory.mktemp("checkout")
    (checkout / ".venv").symlink_to(REPO_ROOT / ".venv")
    (checkout / MAL_EXPORT).write_bytes(gzip.compress(MAL_XML.encode()))
    store = checkout / "models"
    store.mkdir()
    (store / bundle.name).symlink_to(bundle)
    env = {k: v for k, v in os.environ.items() if not k.startswith("A2V_GATEWAY_API_KEYS")} | OFFLINE_ENV
    # make run's default number of ranker processes (one per core, at most 4): gateway, encoder, then one port each
    grpc_base, metrics_base = free_port_runs(2 + ranker_processes_from_env(env))
    proc = start_runlocal(
        store,
        checkout / "var" / "run",
        "--base-port",
        str(grpc_base),
        "--metrics-base-port",
        str(metrics_base),
        env=env,
    )
    output = Output(proc.stdout)
    try:
        ready = output.wait_for(lambda lines: any("anime2vec is running" in x for x in lines), STARTUP_TIMEOUT_S, proc)
        assert ready, f"make run did not serve:\n{output.text()}"
        yield Runner(proc, output, checkout, grpc_base)
    finally:
        if proc.poll() is None:
            proc.kill()


def _expect(example: str, result: subprocess.CompletedProcess) -> None:
    """rc 0, nothing on stderr, and what the command is for on stdout."""
    assert result.returncode == 0 and result.stderr == "", (
        f"{example}\nexit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    out, words = result.stdout, shlex.split(example.split(CLIENT, 1)[1].split("#")[0])
    command = words[words.index("call")] if "call" in words else next(w for w in words if not w.startswith("-"))
    expected = {
        "recommend": "served by: ",
        "similar": "similar to: ",
        "search-text": "served by: ",
        "for-user": "served by: ",
        "import-mal": "read 7 entries",
        "add-anime": "added anime #",
        "resolve": "Fullmetal Alchemist",
        "feedback": "applied 3, duplicates 0",
        "info": "model version",
    }
    if command in expected:
        assert expected[command] in out, f"{example}\n{out}"
    elif command == "users":
        assert out.split() and all(x.isdigit() for x in out.split()), f"{example}\n{out}"
    elif command == "call" and words[words.index("call") + 1] == "list":
        assert "anime2vec.v1.GatewayService" in out.split(), out
    elif command == "call" and "--describe" in words:
        assert out.startswith("service anime2vec.v1.GatewayService") and "rpc Recommend(" in out, out
    elif command == "call":
        assert isinstance(json.loads(out), dict), out
    else:
        raise AssertionError(f"no expectation for {command!r} ({example})")


def test_the_readme_examples_are_found_and_explain_the_key_first():
    readme = (REPO_ROOT / "README.md").read_text()
    found = examples(readme)
    assert len({e.command.split()[3] for e in found}) >= 10  # every client command is exemplified
    quick = [e for e in found if e.section == "Quick start"]
    assert quick and all("export A2V_API_KEY=$(cat var/run/api-key)" in e.prelude for e in quick)
    body = "\n".join(sections(readme)[t] for t in SECTIONS)
    assert not re.search(r"^\s*python3? -m anime2vec", body, re.M), "bare python: the venv's is .venv/bin/python"


def test_a_filter_the_catalogue_cannot_answer_says_why(runner):
    """Before the README adds an anime with a year: the sample has no years and no music videos."""
    key = ["export A2V_API_KEY=$(cat var/run/api-key)"]
    result = runner.run(key, f"{CLIENT} recommend Naruto --year-min 2000 --type Music")
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr.splitlines()[1:] == [
        "  options.filters.types[0]: no anime of type 'Music' in this catalogue (its types: Movie, ONA, OVA, Special, TV)",
        "  options.filters.year_min: no anime in this catalogue has a known year, so a year filter matches nothing: "
        "leave it out",
    ]


def test_every_readme_command_works_when_pasted_after_make_run(runner):
    failures = []
    for example in examples((REPO_ROOT / "README.md").read_text()):
        result = runner.run(example.prelude, example.command)
        try:
            _expect(example.command, result)
        except AssertionError as e:
            failures.append(f"[{example.section}] {e}")
    assert not failures, "\n\n".join(failures)


def test_the_commands_make_run_prints_work(runner):
    printed = runner.output.text().split("Try it", 1)[1].splitlines()[1:]
    lines = [x.strip() for x in printed if x.strip().startswith(("export ", CLIENT))]
    prelude = [x.split("  #")[0] for x in lines if x.startswith("export ")]
    commands = [x for x in lines if x.startswith(CLIENT)]
    assert len(prelude) == 2 and len(commands) >= 4, printed
    for command in commands:
        _expect(command, runner.run(prelude, command))


def test_ctrl_c_stops_the_runner_and_every_service(runner):
    """Last (module order): the stack is not needed after this."""
    seen = {p.pid: p for p in descendants(runner.proc.pid)}
    assert {"services.gateway.server", "services.ranker.server", "services.encoder.server"} <= {
        m for p in seen.values() for m in p.cmdline.split() if m.startswith("services.")
    }
    runner.proc.send_signal(signal.SIGINT)
    rc = runner.proc.wait(timeout=120)
    leftovers = still_running(set(seen), {p.session for p in seen.values()} - {os.getsid(0)})
    for p in leftovers:
        os.kill(p.pid, signal.SIGKILL)
    assert not leftovers and rc == 0, (leftovers, runner.output.text()[-3000:])
    assert "stopped gateway (exit status 0)" in runner.output.text()

"""`make run`: the wiring (a bundle trained on a pre-trained encoder gets that encoder in the
encoder service), the local API key, and that Ctrl-C / SIGTERM stop every child at any stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import (
    OFFLINE_ENV,
    api_key_env,
    bundle_encoder_dir,
    default_ranker_processes,
    ranker_processes_from_env,
    standard_specs,
)
from anime2vec.runlocal import main as runlocal_main
from services.gateway.auth import load_api_keys
from services.gateway.settings import GatewaySettings
from tests.processes import Output, Proc, descendants, free_port_runs, runlocal_argv, start_runlocal, still_running


def _bundle(tmp_path: Path, model_dir) -> Path:
    b = tmp_path / "v1"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({"encoder": {"name": "x", "model_dir": model_dir}}))
    return b


def _encoder_env(model_dir):
    specs = standard_specs(
        "127.0.0.1",
        {"encoder": (1, 2), "ranker": (3, 4), "gateway": (5, 6)},
        encoder_model="minilm",
        model_store=Path("/s"),
        bundle="v1",
        ranker_data_dir=Path("/d"),
        gateway_env={},
        encoder_model_dir=model_dir,
    )
    return next(s for s in specs if s.name == "encoder").env


def test_several_ranker_processes_each_get_a_data_dir_and_ports_and_share_the_first_ones_store_and_alias():
    ports = {"encoder": (1, 2), "gateway": (5, 6), "ranker": (3, 4)}
    kw = dict(
        encoder_model="minilm",
        model_store=Path("/s"),
        bundle="v1",
        ranker_data_dir=Path("/d/ranker"),
        gateway_env={},
        follow_alias=True,
    )
    one = standard_specs("127.0.0.1", ports, **kw)
    three = standard_specs("127.0.0.1", ports | {"ranker-1": (7, 8), "ranker-2": (9, 10)}, **kw)
    first = next(s for s in one if s.name == "ranker")
    rankers = [s for s in three if s.name == "ranker"]
    assert [r.label for r in rankers] == ["ranker", "ranker-1", "ranker-2"]
    assert rankers[0].env == first.env and (rankers[0].grpc_port, rankers[0].metrics_port) == (3, 4)  # as alone
    assert "STORE_DIR" not in first.env and first.env["DATA_DIR"] == "/d/ranker"
    for i, r in enumerate(rankers[1:], 1):
        assert (r.grpc_port, r.metrics_port) == (5 + 2 * i, 6 + 2 * i)
        # its own embedded collections, the first one's stores of record and alias
        assert r.env["DATA_DIR"] == f"/d/ranker-{i}"
        assert r.env["STORE_DIR"] == r.env["ALIAS_DATA_DIR"] == "/d/ranker"
        assert {k: v for k, v in r.env.items() if k not in ("DATA_DIR", "STORE_DIR", "ALIAS_DATA_DIR")} == {
            k: v for k, v in first.env.items() if k != "DATA_DIR"
        }
    gateway = next(s for s in three if s.name == "gateway")
    assert gateway.env["RANKER_ADDRESS"] == "127.0.0.1:3,127.0.0.1:7,127.0.0.1:9"
    assert next(s for s in one if s.name == "gateway").env["RANKER_ADDRESS"] == "127.0.0.1:3"
    assert GatewaySettings(api_keys="k", ranker_address=gateway.env["RANKER_ADDRESS"])  # the gateway takes the list


@pytest.mark.parametrize("value", ["0", "-1", "17", "two", "1.5", " "])
def test_bad_ranker_process_counts_are_refused_before_anything_starts(tmp_path, capsys, monkeypatch, value):
    args = ["--sample", "--store", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as exit_:
        runlocal_main([*args, "--ranker-processes", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ranker-processes: the number of ranker processes must be a whole number from 1 to 16" in err
    if value.strip():  # an empty A2V_RANKER_PROCESSES means unset (the default)
        monkeypatch.setenv("A2V_RANKER_PROCESSES", value)
        with pytest.raises(SystemExit) as exit_:
            runlocal_main(args)
        assert exit_.value.code == 2
        assert "A2V_RANKER_PROCESSES: the number of ranker processes must be a whole number" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()


def test_the_default_is_one_ranker_process_per_available_core_at_most_four(monkeypatch):
    monkeypatch.delenv("A2V_RANKER_PROCESSES", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert default_ranker_processes() == min(cores, 4) == ranker_processes_from_env(os.environ)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_ranker_processes() == 4
    assert ranker_processes_from_env({"A2V_RANKER_PROCESSES": "1"}) == 1  # today's single ranker
    assert ranker_processes_from_env({"A2V_RANKER_PROCESSES": "8"}) == 8  # past the default's cap when asked


def test_the_bundles_encoder_directory_reaches_the_encoder_service(tmp_path):
    rel = bundle_encoder_dir(_bundle(tmp_path, "models/encoders/minilm-mal-mlm"))
    assert rel == REPO_ROOT / "models/encoders/minilm-mal-mlm"
    assert _encoder_env(rel) == {"MODEL": "minilm", "MODEL_DIR": str(rel)}


def test_stock_minilm_bundles_and_unreadable_manifests_keep_the_default(tmp_path):
    assert bundle_encoder_dir(_bundle(tmp_path, None)) is None
    assert bundle_encoder_dir(tmp_path / "missing") is None
    assert _encoder_env(None) == {"MODEL": "minilm"}


# ---- the local API key --------------------------------------------------------------------------


def test_the_local_key_is_a_bare_token_for_clients_and_has_every_scope_at_the_gateway(tmp_path, monkeypatch):
    monkeypatch.delenv("A2V_GATEWAY_API_KEYS", raising=False)
    monkeypatch.delenv("A2V_GATEWAY_API_KEYS_FILE", raising=False)
    key_file = tmp_path / "run" / "api-key"
    env, token = api_key_env(key_file)
    assert key_file.read_text() == token + "\n" and len(token) == 40  # `$(cat var/run/api-key)` is the token
    scoped = Path(env["API_KEYS_FILE"])
    (configured,) = load_api_keys(GatewaySettings(api_keys_file=scoped))  # as the gateway reads it
    assert (configured.key, configured.scopes) == (token, frozenset({"read", "feedback", "catalog"}))
    assert {oct(p.stat().st_mode & 0o777) for p in (key_file, scoped)} == {"0o600"}
    assert api_key_env(key_file) == (env, token)  # generated once, reused


def test_configured_keys_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("A2V_GATEWAY_API_KEYS", "ops:read")
    assert api_key_env(tmp_path / "api-key") == ({}, None)
    assert not (tmp_path / "api-key").exists()


# ---- signals: Ctrl-C / SIGTERM stop every child, training included ------------------------------


def test_sigterm_during_training_stops_the_training_child_and_everything_it_started(tmp_path):
    env = os.environ | OFFLINE_ENV | {"A2V_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache: training runs long
    runner = start_runlocal(tmp_path / "models", tmp_path / "state", env=env)
    out = Output(runner.stdout)
    seen: dict[int, Proc] = {}
    try:

        def training_has_started(lines) -> bool:
            seen.update((p.pid, p) for p in descendants(runner.pid))
            trainers = [p for p in seen.values() if "anime2vec.cli train" in p.cmdline]
            # the runner's own announcement, then at least one line of the training's own output
            announced = next((i for i, line in enumerate(lines) if "training one" in line), None)
            return bool(trainers) and announced is not None and len(lines) > announced + 1

        assert out.wait_for(training_has_started, 180, runner), f"training did not start:\n{out.text()}"
        trainer = next(p for p in seen.values() if "anime2vec.cli train" in p.cmdline)
        assert trainer.pid in {p.pid for p in descendants(runner.pid)}, "training ended before the signal"
        seen.update((p.pid, p) for p in descendants(runner.pid))

        runner.send_signal(signal.SIGTERM)
        rc = runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
        leftovers = still_running(set(seen), {p.session for p in seen.values()} - {os.getsid(0)})
        for p in leftovers:  # never leave a training running on the shared machine
            os.kill(p.pid, signal.SIGKILL)
    assert not leftovers, f"still running after the runner stopped: {leftovers}"
    assert rc == 128 + signal.SIGTERM and "stopping..." in out.text(), out.text()


# ---- the quick bundle first, the full one promoted by the quality gate ---------------------------


def _client(state: Path, grpc_base: int, *args: str) -> subprocess.CompletedProcess:
    env = (
        os.environ
        | OFFLINE_ENV
        | {"A2V_API_KEY": (state / "api-key").read_text().strip(), "A2V_GATEWAY_ADDRESS": f"127.0.0.1:{grpc_base}"}
    )
    return subprocess.run(
        [sys.executable, "-m", "anime2vec.client", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _info(state: Path, grpc_base: int) -> dict:
    r = _client(state, grpc_base, "info", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ranker_version(grpc_port: int) -> str:
    """The version one ranker process serves, asked directly."""
    import grpc

    from anime2vec.v1 import common_pb2, ranker_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).model.version


def _start(store: Path, state: Path, *args: str) -> tuple[subprocess.Popen, Output, int]:
    """The runner with two ranker processes (gateway, encoder, rankers on 4 consecutive ports)."""
    grpc_base, metrics_base = free_port_runs(4)
    runner = start_runlocal(
        store,
        state,
        "--base-port",
        str(grpc_base),
        "--metrics-base-port",
        str(metrics_base),
        "--ranker-processes",
        "2",
        *args,
        env=os.environ | OFFLINE_ENV,
    )
    return runner, Output(runner.stdout), grpc_base


def _terminate(runner: subprocess.Popen) -> tuple[int | None, list[Proc]]:
    """SIGTERM the runner; SIGKILL whatever it started that outlived it. (exit status, leftovers)"""
    seen = {p.pid: p for p in descendants(runner.pid)}
    rc = None
    try:
        runner.send_signal(signal.SIGTERM)
        rc = runner.wait(timeout=90)
    except subprocess.TimeoutExpired:
        runner.kill()
    leftovers = still_running(set(seen), {p.session for p in seen.values()} - {os.getsid(0)})
    for p in leftovers:
        os.kill(p.pid, signal.SIGKILL)
    return rc, leftovers


def _stop(runner: subprocess.Popen, out: Output) -> None:
    """SIGTERM: exit 0 (it was serving) and nothing it started is left, the background training included."""
    rc, leftovers = _terminate(runner)
    assert not leftovers, f"still running after the runner stopped: {leftovers}"
    assert rc == 0, out.text()


def test_make_run_serves_the_quick_bundle_then_the_gate_promotes_the_full_one(tmp_path):
    """First run on an empty store: the quick bundle is trained and served, the full one trains in
    the background (GetModelInfo says so) and SIGTERM stops that training too. Second run: the
    quick bundle is reused, the full one trains again and the quality gate promotes it; both
    ranker processes follow, and an anime added while the quick bundle served is served by the full one."""
    store, state = tmp_path / "models", tmp_path / "state"
    runner, out, port = _start(store, state)
    try:
        assert out.wait_for(lambda ls: any("anime2vec is running" in x for x in ls), 400, runner), out.text()
        assert "training one, the quick bundle first" in out.text()
        info = _info(state, port)
        assert info["preset"] == "quick"
        quick = info["version"]
        added = _client(
            state,
            port,
            "add-anime",
            "--title",
            "Alchemy Brothers Zero",
            "--genre",
            "Action",
            "--synopsis",
            "Two brothers who lost their bodies to alchemy search for the stone.",
        )
        assert added.returncode == 0 and "added anime #" in added.stdout, added.stderr
        aid = added.stdout.split("#")[1].split()[0]
        training = lambda ls: any("anime2vec.cli train" in p.cmdline for p in descendants(runner.pid))  # noqa: E731
        assert out.wait_for(training, 60, runner), out.text()
        deadline = time.monotonic() + 30
        while not _info(state, port).get("nextModel", "").startswith("training the full bundle"):
            assert time.monotonic() < deadline, "GetModelInfo never named the training bundle"
            time.sleep(0.5)
        _stop(runner, out)
        assert "stopped the full bundle's train" in out.text(), out.text()

        # the sample's gate metrics move by several points from one tuning to the next (a few dozen
        # queries): a wide tolerance, so that this exercises the promotion; the gate's decisions
        # are tests/retrain's
        runner, out, port = _start(store, state, "--gate-tolerance", "0.5")
        assert out.wait_for(lambda ls: any("anime2vec is running" in x for x in ls), 120, runner), out.text()
        assert "training one" not in out.text() and _info(state, port)["version"] == quick  # reused
        promoted = lambda ls: any("[full bundle]" in x and ("promoted" in x or "keeps serving" in x) for x in ls)  # noqa: E731
        assert out.wait_for(promoted, 900, runner), out.text()
        assert "passed the quality gate and is promoted" in out.text(), out.text()
        deadline = time.monotonic() + 120
        # every ranker process polls the alias; the second builds its copy of the collection first
        while quick in {_ranker_version(port + 2), _ranker_version(port + 3)}:
            assert time.monotonic() < deadline, "a ranker process did not follow the promotion"
            time.sleep(0.5)
        info = _info(state, port)
        assert info["preset"] == "full" and not info.get("nextModel")
        similar = _client(state, port, "similar", "--id", aid, "--limit", "3")
        assert similar.returncode == 0 and "Alchemy Brothers Zero" in similar.stdout, similar.stderr
        assert info["version"] in similar.stdout
        _stop(runner, out)
    finally:  # a failed assertion must not leave the services of a runner behind
        if runner.poll() is None:
            _terminate(runner)


def test_make_run_refuses_ports_in_use_before_training(tmp_path):
    """Another `make run` on the ports: said at once, before any training, and nothing starts."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            runlocal_argv(
                tmp_path / "m",
                tmp_path / "s",
                "--base-port",
                str(port - 2),  # the first ranker's port is taken
                "--metrics-base-port",
                str(free_port_runs(4)[1]),
                "--ranker-processes",
                "2",
            ),
            cwd=REPO_ROOT,
            env=os.environ | OFFLINE_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 1 and f"port(s) {port} on 127.0.0.1 are in use" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists() and "training" not in r.stdout


def test_the_background_progress_reads_steps_and_progress_bars_from_the_training_log():
    from anime2vec.next_bundle import FULL_STEP_SECONDS, Progress

    p = Progress()
    log = (
        "2026-12-03 06:05:44,675 INFO anime2vec.pipeline: ▶ load data\n"
        "2026-12-03 06:05:44,675 INFO anime2vec.pipeline: ✔ load data (3.2 s)\n"
        "2026-12-03 06:05:45,474 INFO anime2vec.pipeline: ▶ encode (cached) + whiten\n"
        "encode:  10%|█         | 1637/16371 [01:40<15:02, 16.3it/s]\r"
        "encode:  41%|████      | 6712/16371 [06:12<08:55, 18.0it/s]\r"
    )
    assert p.feed(log, now=100.0) == ["load data", "encode (cached) + whiten"]
    assert (p.step, p.bar, p.bar_left_s) == ("encode (cached) + whiten", "41% (6712/16371)", 535.0)
    ahead = sum(v for k, v in FULL_STEP_SECONDS.items() if k not in ("load data", "encode (cached) + whiten"))
    assert p.eta_s(sample=False, now=100.0) == 535.0 + ahead and p.eta_s(sample=True) is None
    # a step without a bar: its usual time less what it has taken so far; grid points share a key
    p.feed("INFO anime2vec.pipeline: ▶ fit ease {'lam': 300.0}\n", now=200.0)
    assert p.step == "fit ease {'lam': 300.0}" and p.bar == ""
    assert p.eta_s(sample=False, now=230.0) == ahead - FULL_STEP_SECONDS["fit ease"] + 70.0


def test_the_background_log_is_read_in_whole_lines_and_characters(tmp_path):
    """The trainer writes while the runner reads: a step line split across two reads (even inside
    the ▶'s three bytes) is seen once, whole."""
    from anime2vec.next_bundle import NextBundle

    log = tmp_path / "next.log"
    nb = NextBundle(
        store=tmp_path,
        sample=True,
        report_dir=tmp_path,
        ranker_data_dir=tmp_path,
        status_file=tmp_path / "s.json",
        log_path=log,
        env={},
    )
    line = "INFO anime2vec.pipeline: ▶ fit and tune anime2vec-hybrid\n".encode()
    cut = line.index("▶".encode()) + 1
    log.write_bytes(line[:cut])
    assert nb.progress.feed(nb._new_log_text()) == []
    with open(log, "ab") as f:
        f.write(line[cut:])
    assert nb.progress.feed(nb._new_log_text()) == ["fit and tune anime2vec-hybrid"]

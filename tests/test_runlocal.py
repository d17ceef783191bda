"""`make run`: the wiring (a bundle trained on a pre-trained encoder gets that encoder in the
encoder service), the local API key, and that Ctrl-C / SIGTERM stop every child at any stage."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV, api_key_env, bundle_encoder_dir, standard_specs
from services.gateway.auth import load_api_keys
from services.gateway.settings import GatewaySettings
from tests.processes import Output, Proc, descendants, still_running


def _bundle(tmp_path: Path, model_dir) -> Path:
    b = tmp_path / "v1"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({"encoder": {"name": "x", "model_dir": model_dir}}))
    return b


def _encoder_env(model_dir):
    specs = standard_specs("127.0.0.1", {"encoder": (1, 2), "ranker": (3, 4), "gateway": (5, 6)},
                           encoder_model="minilm", model_store=Path("/s"), bundle="v1",
                           ranker_data_dir=Path("/d"), gateway_env={}, encoder_model_dir=model_dir)
    return next(s for s in specs if s.name == "encoder").env


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
    assert key_file.read_text() == token + "\n" and len(token) == 40   # `$(cat var/run/api-key)` is the token
    scoped = Path(env["API_KEYS_FILE"])
    (configured,) = load_api_keys(GatewaySettings(api_keys_file=scoped))   # as the gateway reads it
    assert (configured.key, configured.scopes) == (token, frozenset({"read", "feedback", "catalog"}))
    assert {oct(p.stat().st_mode & 0o777) for p in (key_file, scoped)} == {"0o600"}
    assert api_key_env(key_file) == (env, token)   # generated once, reused


def test_configured_keys_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("A2V_GATEWAY_API_KEYS", "ops:read")
    assert api_key_env(tmp_path / "api-key") == ({}, None)
    assert not (tmp_path / "api-key").exists()


# ---- signals: Ctrl-C / SIGTERM stop every child, training included ------------------------------

def test_sigterm_during_training_stops_the_training_child_and_everything_it_started(tmp_path):
    env = os.environ | OFFLINE_ENV | {"A2V_CACHE_DIR": str(tmp_path / "cache")}   # a cold cache: training runs long
    runner = subprocess.Popen([sys.executable, "-m", "anime2vec.runlocal", "--sample", "--store", str(tmp_path / "models"),
                               "--state-dir", str(tmp_path / "state")], cwd=REPO_ROOT, env=env, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        for p in leftovers:   # never leave a training running on the shared machine
            os.kill(p.pid, signal.SIGKILL)
    assert not leftovers, f"still running after the runner stopped: {leftovers}"
    assert rc == 128 + signal.SIGTERM and "stopping..." in out.text(), out.text()

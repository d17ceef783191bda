"""Qdrant as deployed (README "Deploying on Kubernetes"): a key in every overlay, from Secrets; each
client holding the key its work needs (read-write, or read-only for the promote Job's wait); Prometheus
admitted to Qdrant's metrics-only port and never to its APIs; TLS on every Qdrant port under the TLS
component, with every client dialling https and verifying the server. The last test plays the
clients over real sockets against a stand-in Qdrant with a throwaway CA: the variables the manifests
set are the ones the ranker and the CLI read, the server is verified, and the key is sent only to it.

What the Qdrant server itself does with these variables is read from its source at the pinned
version (v1.17.1: src/settings.rs `metrics_port`, src/actix/metrics_service.rs, src/actix/mod.rs's
key whitelist, src/common/helpers.rs); no Qdrant binary runs here."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from anime2vec.paths import REPO_ROOT
from tests.deploy.manifests import by_kind, pod_spec, render, workloads
from tests.deploy.test_manifests import _allows

OVERLAYS = ("overlays/local", "overlays/gpu", "overlays/production", "overlays/production-tls")
CLIENT_TREES = ("jobs", "release")  # applied into whichever environment runs them
RW, RO = "anime2vec-qdrant-api-key", "anime2vec-qdrant-read-only-api-key"
TLS_SECRET = "anime2vec-qdrant-tls"
KEY_VAR = "QDRANT_API_KEY"  # the entry of both Secrets; what the ranker and the CLI read
METRICS_PORT = 9103
# (workload, container) -> the Secret whose key it holds. Everything else holds none.
CLIENTS = {
    ("ranker", "ranker"): RW,  # upserts added anime, online users
    ("anime2vec-index", "index"): RW,  # creates a collection
    ("anime2vec-promote", "promote"): RW,  # moves the alias
    ("anime2vec-promote", "wait-for-index"): RO,  # `versions`: GET requests only
    ("anime2vec-retrain", "retrain"): RW,  # index + promote
}


def _qdrant(tree: str) -> dict:
    return pod_spec(by_kind(tree, "StatefulSet")["qdrant"])["containers"][0]


def _containers(tree: str):
    for obj in workloads(tree):
        spec = pod_spec(obj)
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield obj["metadata"]["name"], spec, c


def _environment(overlay: str):
    """(workload, pod spec, container) for the overlay's workloads and the Jobs applied beside them."""
    for tree in (overlay, *CLIENT_TREES):
        yield from _containers(tree)


def _env(container: dict, maps: dict[str, dict]) -> dict[str, str]:
    """Plain values as the pod sees them: the ConfigMaps it loads (envFrom, from the environment's
    overlay: the Jobs' trees carry none), then `env` values."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            ref = src["configMapRef"]
            assert ref["name"] in maps or ref.get("optional"), f"{container['name']}: no ConfigMap {ref['name']}"
            env.update(maps.get(ref["name"], {}).get("data", {}))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _qdrant_url(env: dict[str, str]) -> str | None:
    """The URL the ranker (RankerSettings) and the CLI (cmd_rollout, retrain) use: the A2V_RANKER_
    setting first, then the conventional QDRANT_URL."""
    return env.get("A2V_RANKER_QDRANT_URL") or env.get("QDRANT_URL")


def _key_secrets(container: dict) -> set[str]:
    refs = {src["secretRef"]["name"] for src in container.get("envFrom", []) if "secretRef" in src}
    refs |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {}) and "API_KEY" in e["name"]
    }
    return refs & {RW, RO}


def _secret_file(spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret, key) projected at `path` by a read-only Secret mount of the container."""
    mount = next((m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")), None)
    assert mount is not None, f"{container['name']}: nothing mounted at {path}"
    assert mount.get("readOnly") is True, f"{container['name']}: {path} must be mounted read-only"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["secret"]["items"] if i["path"] == path[len(mount["mountPath"]) + 1 :])
    return volume["secret"]["secretName"], item["key"]


# ---- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_qdrant_requires_keys_from_secrets_in_every_overlay(overlay):
    env = {e["name"]: e for e in _qdrant(overlay)["env"]}
    assert env["QDRANT__SERVICE__API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": RW, "key": KEY_VAR}}
    assert env["QDRANT__SERVICE__READ_ONLY_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": RO, "key": KEY_VAR}}
    # the previous key during a rotation: same Secret, and optional (absent outside a rotation)
    alt = env["QDRANT__SERVICE__ALT_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert alt["name"] == RW and alt["optional"] is True
    literal = [n for n, e in env.items() if "API_KEY" in n and "value" in e]
    assert not literal, f"{overlay}: Qdrant keys written into the manifest: {literal}"


@pytest.mark.parametrize("tree", OVERLAYS + CLIENT_TREES)
def test_no_key_is_committed(tree):
    assert not [o for o in render(tree) if o["kind"] == "Secret"], "Secrets are created out of band"
    for cm in by_kind(tree, "ConfigMap").values():
        keys = [k for k in cm.get("data", {}) if re.search(r"API_KEYS?$", k)]  # a key itself, not a file path
        assert not keys, f"{tree}: ConfigMap {cm['metadata']['name']} holds {keys}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_qdrant_client_holds_exactly_the_key_its_work_needs(overlay):
    maps = by_kind(overlay, "ConfigMap")
    seen = {}
    for workload, _, c in _environment(overlay):
        if workload == "qdrant":  # the server: both keys, checked above
            continue
        secrets = _key_secrets(c)
        url = _qdrant_url(_env(c, maps))
        where = f"{overlay}: {workload}/{c['name']}"
        expected = CLIENTS.get((workload, c["name"]))
        if expected is None:
            assert not secrets, f"{where} does not talk to Qdrant but holds {secrets}"
            assert url is None, f"{where} has a Qdrant URL {url} but no key"
            continue
        assert secrets == {expected}, f"{where}: holds {secrets or 'no key'}, needs {expected} only"
        assert url is not None and url.endswith("://qdrant:6333"), f"{where}: Qdrant URL {url}"
        seen[(workload, c["name"])] = expected
    assert seen == CLIENTS, f"{overlay}: clients missing: {set(CLIENTS) - set(seen)}"

    # The network agrees: what can reach Qdrant's API holds a key, and every key holder can reach it.
    policies = {
        **by_kind(overlay, "NetworkPolicy"),
        **by_kind("jobs", "NetworkPolicy"),
        **by_kind("release", "NetworkPolicy"),
    }
    names = {w for w, _, _ in _environment(overlay)} - {"qdrant"}
    reach = {w for w in names if _allows(policies, w, "qdrant", 6333)}
    assert reach == {w for w, _ in CLIENTS}, f"{overlay}: reach Qdrant's API: {sorted(reach)}"


# ---- metrics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_reaches_qdrant_metrics_port_and_nothing_else(overlay):
    qc = _qdrant(overlay)
    env = {e["name"]: e.get("value") for e in qc["env"]}
    assert env["QDRANT__SERVICE__METRICS_PORT"] == str(METRICS_PORT)
    # the separate metrics port (no key, /metrics only) arrived in Qdrant 1.17.0
    version = tuple(int(x) for x in re.match(r"qdrant/qdrant:v(\d+)\.(\d+)\.(\d+)", qc["image"]).groups())
    assert version >= (1, 17, 0), f"{qc['image']} has no separate metrics port"
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in qc["ports"]
    q = by_kind(overlay, "StatefulSet")["qdrant"]
    assert q["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    ports = {p["name"]: p for p in by_kind(overlay, "Service")["qdrant"]["spec"]["ports"]}
    assert ports["metrics"]["port"] == METRICS_PORT and ports["metrics"]["targetPort"] == "metrics"

    policies = {
        **by_kind(overlay, "NetworkPolicy"),
        **by_kind("jobs", "NetworkPolicy"),
        **by_kind("release", "NetworkPolicy"),
    }
    assert _allows(policies, None, "qdrant", METRICS_PORT, namespace="monitoring")
    for port in (6333, 6334, 6335):  # REST (collection deletes included), gRPC, cluster p2p
        assert not _allows(policies, None, "qdrant", port, namespace="monitoring"), f"monitoring -> qdrant:{port}"
    assert not _allows(policies, None, "qdrant", METRICS_PORT, namespace="default")
    for name in ("gateway", "encoder", "ranker"):  # the services' metrics ports don't open Qdrant's
        assert not _allows(policies, name, "qdrant", METRICS_PORT)

    monitors = by_kind(overlay, "ServiceMonitor")
    if monitors:
        assert [e["port"] for e in monitors["qdrant"]["spec"]["endpoints"]] == ["metrics"]


# ---- TLS -----------------------------------------------------------------------------------------


def test_production_tls_qdrant_serves_tls_and_every_client_verifies_it():
    tree = "overlays/production-tls"
    maps = by_kind(tree, "ConfigMap")
    q = by_kind(tree, "StatefulSet")["qdrant"]
    spec, qc = pod_spec(q), _qdrant(tree)
    env = {e["name"]: e.get("value") for e in qc["env"]}
    assert env["QDRANT__SERVICE__ENABLE_TLS"] == "true"
    assert _secret_file(spec, qc, env["QDRANT__TLS__CERT"]) == (TLS_SECRET, "tls.crt")
    assert _secret_file(spec, qc, env["QDRANT__TLS__KEY"]) == (TLS_SECRET, "tls.key")
    assert _secret_file(spec, qc, env["QDRANT__TLS__CA_CERT"]) == (TLS_SECRET, "ca.crt")
    # peers: mutual TLS on p2p, dialled as https (the bootstrap script reads the scheme)
    assert env["QDRANT__CLUSTER__P2P__ENABLE_TLS"] == "true" and env["A2V_QDRANT_P2P_SCHEME"] == "https"
    assert "${A2V_QDRANT_P2P_SCHEME:-http}" in qc["args"][0]
    # kubelet probes speak HTTPS (and need no key: Qdrant whitelists /healthz and /readyz)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert qc[probe]["httpGet"]["scheme"] == "HTTPS" and qc[probe]["httpGet"]["port"] == 6333
    assert "QDRANT__SERVICE__VERIFY_HTTPS_CLIENT_CERTIFICATE" not in env  # probes present no certificate

    for workload, pod, c in _environment(tree):
        if (workload, c["name"]) not in CLIENTS:
            continue
        cenv = _env(c, maps)
        assert _qdrant_url(cenv) == "https://qdrant:6333", f"{workload}/{c['name']}"
        assert _secret_file(pod, c, cenv["SSL_CERT_FILE"]) == (TLS_SECRET, "ca.crt"), f"{workload}/{c['name']}"

    endpoint = by_kind(tree, "ServiceMonitor")["qdrant"]["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": TLS_SECRET, "key": "ca.crt"}}, "serverName": "qdrant"}
    assert q["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"


@pytest.mark.parametrize("overlay", ("overlays/local", "overlays/production"))
def test_without_the_tls_component_qdrant_and_its_clients_speak_plain_http(overlay):
    """TLS where the overlay has TLS, and nowhere half-way: a client dialling https to a plain server
    (or the reverse) would fail every call."""
    maps = by_kind(overlay, "ConfigMap")
    assert "QDRANT__SERVICE__ENABLE_TLS" not in {e["name"] for e in _qdrant(overlay)["env"]}
    for workload, _, c in _environment(overlay):
        if (workload, c["name"]) in CLIENTS:
            cenv = _env(c, maps)
            assert _qdrant_url(cenv) == "http://qdrant:6333" and "SSL_CERT_FILE" not in cenv


# ---- the clients over real sockets -----------------------------------------------------------------


class _StandInQdrant(BaseHTTPRequestHandler):
    """Answers the read calls `versions` and the ranker's start-up check make, as Qdrant would:
    403 without a configured key, and the read-only key for GET only (Qdrant's rule)."""

    keys: dict[str, str] = {}  # key -> "rw" | "ro"
    seen: list[tuple[str, str, str]] = []

    def log_message(self, *args):  # quiet
        pass

    def _answer(self):
        key = self.headers.get("api-key", "")
        self.seen.append((self.command, self.path, self.keys.get(key, "none")))
        role = self.keys.get(key)
        if role is None or (role == "ro" and self.command != "GET"):
            body, status = {"status": {"error": "Must provide an API key or an Authorization bearer token"}}, 403
        elif self.path.startswith("/collections"):
            body, status = {"result": {"collections": []}, "status": "ok", "time": 0.0}, 200
        elif self.path.startswith("/aliases"):
            body, status = {"result": {"aliases": []}, "status": "ok", "time": 0.0}, 200
        else:
            body, status = {"status": {"error": f"not found: {self.path}"}}, 404
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


@pytest.fixture()
def stand_in(tmp_path):
    from tests.serving.certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "pki", name="qdrant test CA")
    cert = ca.issue("qdrant", dns=("localhost",), ips=("127.0.0.1",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    handler = type("Handler", (_StandInQdrant,), {"keys": {"rw-key": "rw", "ro-key": "ro"}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ca.ca_file, server.server_address[1], handler.seen
    server.shutdown()
    server.server_close()


def _local(env: dict[str, str], port: int, ca_file) -> dict[str, str]:
    """The rendered values with the cluster's names swapped for this machine's: qdrant:6333 -> the
    stand-in, the mounted CA path -> the throwaway CA."""
    out = {}
    for k, v in env.items():
        if k == "SSL_CERT_FILE":
            out[k] = str(ca_file)
        elif k in ("QDRANT_URL", "A2V_RANKER_QDRANT_URL"):
            out[k] = (
                v.replace("://qdrant:6333", f"://localhost:{port}") if v.startswith("https") else "http://127.0.0.1:9"
            )  # a plain fallback that must lose (nothing listens there)
        else:
            out[k] = v
    return out


def _cli_versions(env: dict[str, str], store) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("QDRANT", "A2V_", "SSL_CERT")) and k != "PYTHONPATH"
    }
    return subprocess.run(
        [sys.executable, "-m", "anime2vec.cli", "versions", "--store", str(store)],
        env={**base, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_clients_dial_qdrant_over_verified_tls_with_their_key(stand_in, tmp_path, monkeypatch):
    ca_file, port, seen = stand_in
    tree = "overlays/production-tls"
    maps = by_kind(tree, "ConfigMap")
    containers = {(w, c["name"]): c for w, _, c in _environment(tree)}
    store = tmp_path / "store"
    store.mkdir()

    # The ranker, in-process: RankerSettings from the rendered variables, then the index it serves from.
    from anime2vec.index.backends import open_index
    from services.ranker.settings import RankerSettings

    renv = _env(containers[("ranker", "ranker")], maps)
    for k, v in _local({k: renv[k] for k in ("QDRANT_URL", "SSL_CERT_FILE")}, port, ca_file).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(KEY_VAR, "rw-key")
    s = RankerSettings()
    open_index(None, s.qdrant_url, s.qdrant_api_key or None).close()
    assert seen and {role for _, _, role in seen} == {"rw"}

    # The promote Job's wait, as its init container runs it: read-only key, GET requests only.
    seen.clear()
    wait = _local(_env(containers[("anime2vec-promote", "wait-for-index")], maps), port, ca_file)
    proc = _cli_versions({**wait, KEY_VAR: "ro-key"}, store)
    assert proc.returncode == 0, proc.stderr
    assert seen and {(m, role) for m, _, role in seen} == {("GET", "ro")}

    # The retrain CronJob: its explicit plain QDRANT_URL is a fallback the environment's https URL beats.
    seen.clear()
    retrain = _local(_env(containers[("anime2vec-retrain", "retrain")], maps), port, ca_file)
    assert retrain["QDRANT_URL"].startswith("http://") and retrain["A2V_RANKER_QDRANT_URL"].startswith("https://")
    proc = _cli_versions({**retrain, KEY_VAR: "rw-key"}, store)
    assert proc.returncode == 0, proc.stderr
    assert {role for _, _, role in seen} == {"rw"}

    # Without the CA the server is not trusted: the call fails and the key never leaves the client.
    seen.clear()
    proc = _cli_versions({k: v for k, v in wait.items() if k != "SSL_CERT_FILE"} | {KEY_VAR: "ro-key"}, store)
    assert proc.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr, proc.stderr
    monkeypatch.delenv("SSL_CERT_FILE")
    from anime2vec.index.base import IndexUnavailable

    with pytest.raises(IndexUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        open_index(None, s.qdrant_url, s.qdrant_api_key or None)
    assert seen == []

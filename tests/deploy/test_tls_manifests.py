"""The TLS component (deploy/k8s/components/tls, applied by overlays/production-tls): every service
serves TLS from a mounted Secret, encoder and ranker require client certificates, the callers present
theirs, probes use the plaintext health-only port, and every variable it sets is a real setting."""

from __future__ import annotations

import pytest

from services.encoder.settings import EncoderSettings
from services.gateway.settings import GatewaySettings
from services.ranker.settings import RankerSettings
from tests.deploy.manifests import by_kind, pod_spec, render

TREE = "overlays/production-tls"
SETTINGS = {"encoder": EncoderSettings, "ranker": RankerSettings, "gateway": GatewaySettings}
MUTUAL = {"encoder", "ranker"}  # the gateway's public callers use API keys, not certificates
CALLERS = {"ranker", "gateway"}  # services that dial others


def _env(container: dict) -> dict[str, str]:
    maps = by_kind(TREE, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]]["data"])
    return env


def _secret_file(spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(secret name, key) of the file at `path`, which must come from a read-only Secret mount."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True, f"{path}: the certificate mount must be read-only"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    rel = path[len(mount["mountPath"]) + 1 :]
    item = next(i for i in volume["secret"]["items"] if i["path"] == rel)
    return volume["secret"]["secretName"], item["key"]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_service_serves_tls_from_its_secret_and_is_probed_in_plaintext(name):
    spec = pod_spec(by_kind(TREE, "Deployment")[name])
    c = spec["containers"][0]
    env = _env(c)
    prefix = f"A2V_{name.upper()}_"
    secret = f"anime2vec-{name}-tls"
    assert _secret_file(spec, c, env[prefix + "TLS_CERT_FILE"]) == (secret, "tls.crt")
    assert _secret_file(spec, c, env[prefix + "TLS_KEY_FILE"]) == (secret, "tls.key")
    if name in MUTUAL:
        assert _secret_file(spec, c, env[prefix + "TLS_CLIENT_CA_FILE"]) == (secret, "ca.crt")
    else:
        assert prefix + "TLS_CLIENT_CA_FILE" not in env
    if name in CALLERS:
        assert _secret_file(spec, c, env[prefix + "OUTBOUND_TLS_CA_FILE"]) == (secret, "ca.crt")
        assert _secret_file(spec, c, env[prefix + "OUTBOUND_TLS_CERT_FILE"]) == (secret, "tls.crt")
        assert _secret_file(spec, c, env[prefix + "OUTBOUND_TLS_KEY_FILE"]) == (secret, "tls.key")
    # Kubernetes gRPC probes speak plaintext: they must use the health-only port, never the TLS one.
    health = int(env[prefix + "HEALTH_PORT"])
    assert health != int(env[prefix + "GRPC_PORT"]) and health in {p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            assert c[probe]["grpc"]["port"] == health, f"{name}.{probe}"
    # Every variable the component sets is a setting of that service (a typo would be ignored silently).
    fields = SETTINGS[name].model_fields
    unknown = [k for k in env if k.startswith(prefix) and k[len(prefix) :].lower() not in fields]
    assert not unknown, f"{name}: not settings: {unknown}"


def test_tls_changes_nothing_else_than_production():
    def shape(tree):
        return sorted(
            (o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"])
            for o in render(tree)
        )

    assert shape(TREE) == shape("overlays/production")
    prod = by_kind("overlays/production", "Deployment")
    for name, d in by_kind(TREE, "Deployment").items():
        assert d["spec"]["replicas"] == prod[name]["spec"]["replicas"]
        assert pod_spec(d)["containers"][0]["image"] == pod_spec(prod[name])["containers"][0]["image"]

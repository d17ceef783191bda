"""The Kubernetes manifests: every overlay renders, validates strictly against a pinned Kubernetes
API, and every container carries the hardening the deployment promises."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from tests.deploy.manifests import CRD_KINDS, SERVICE_UID, TREES, by_kind, pod_spec, render, workloads

KUBERNETES_VERSION = "1.31.0"
PORTS = {"gateway": (50050, 9100), "encoder": (50051, 9101), "ranker": (50052, 9102)}


@pytest.mark.parametrize("tree", TREES)
def test_every_object_validates_strictly(tree):
    objs = render(tree)
    assert objs, f"{tree} rendered nothing"
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{tree}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def _containers(tree):
    for obj in workloads(tree):
        spec = pod_spec(obj)
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield obj, spec, c


@pytest.mark.parametrize("tree", TREES)
def test_every_container_is_hardened(tree):
    seen = 0
    for obj, spec, c in _containers(tree):
        where = f"{tree}: {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
        seen += 1
        if obj["kind"] not in ("Job", "CronJob"):  # runs to completion; probes would only kill a long training run
            assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: needs liveness and readiness probes"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: resources.{part} needs cpu and memory"
        sc = c.get("securityContext", {})
        pod_sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser must be a non-root uid"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop [ALL]"
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccompProfile RuntimeDefault"
        # An exact tag everywhere (the digest policy of the production trees is tests/deploy/test_images.py).
        name, _, tag = c["image"].partition("@")[0].rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"{where}: image {c['image']!r} is not pinned"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
    assert seen, f"{tree} has no containers"


@pytest.mark.parametrize("tree", ("overlays/local", "overlays/gpu", "overlays/production"))
def test_services_probe_their_grpc_ports_and_qdrant_its_health_endpoints(tree):
    deployments = by_kind(tree, "Deployment")
    assert set(deployments) == set(PORTS)
    for name, (grpc_port, metrics_port) in PORTS.items():
        pod = deployments[name]["spec"]["template"]
        c = pod["spec"]["containers"][0]
        assert c["livenessProbe"]["grpc"]["port"] == grpc_port
        assert c["readinessProbe"]["grpc"]["port"] == grpc_port
        assert {p["containerPort"] for p in c["ports"]} == {grpc_port, metrics_port}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
        assert pod["spec"]["securityContext"]["runAsUser"] == SERVICE_UID
        env = _env(tree, c)
        assert env[f"A2V_{name.upper()}_GRPC_PORT"] == str(grpc_port)
        assert env[f"A2V_{name.upper()}_METRICS_PORT"] == str(metrics_port)
    q = by_kind(tree, "StatefulSet")["qdrant"]
    qc = pod_spec(q)["containers"][0]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", qc["image"])
    assert qc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 6333}
    assert qc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 6333}
    assert q["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {m["name"] for m in qc["volumeMounts"]}


def _env(tree: str, container: dict) -> dict[str, str]:
    """The container's environment as the pod sees it: its ConfigMaps (envFrom), then `env`. Secrets
    (envFrom secretRef, valueFrom) are not in the tree: tests/deploy/test_qdrant_security.py checks those."""
    maps = by_kind(tree, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("tree", ("overlays/local", "overlays/production"))
def test_wiring_between_services(tree):
    d = by_kind(tree, "Deployment")
    services = by_kind(tree, "Service")
    ranker = d["ranker"]["spec"]["template"]["spec"]
    renv = _env(tree, ranker["containers"][0])
    assert renv["QDRANT_URL"] == "http://qdrant:6333" and "qdrant" in services
    assert renv["A2V_RANKER_ENCODER_ADDRESS"] == "encoder:50051"
    store = renv["A2V_RANKER_MODEL_STORE"]
    mounts = {m["mountPath"]: m["name"] for m in ranker["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in ranker["volumes"]}
    assert claims[mounts[store]] == "anime2vec-models"
    # the stores of record are in PostgreSQL: the data dir is scratch, no volume shared between replicas
    data = next(v for v in ranker["volumes"] if v["name"] == mounts[renv["A2V_RANKER_DATA_DIR"]])
    assert "emptyDir" in data and "persistentVolumeClaim" not in data
    assert renv["A2V_RANKER_STORE_DSN"].startswith("host=anime2vec-postgres-rw ")

    gateway = d["gateway"]["spec"]["template"]["spec"]
    genv = _env(tree, gateway["containers"][0])
    assert genv["A2V_GATEWAY_RANKER_ADDRESS"] == "ranker:50052"
    assert genv["A2V_GATEWAY_ENCODER_ADDRESS"] == "encoder:50051"
    assert "A2V_GATEWAY_API_KEYS" not in genv, "keys belong in the Secret file, not in a ConfigMap"
    keys_file = genv["A2V_GATEWAY_API_KEYS_FILE"]
    mount = next(m for m in gateway["containers"][0]["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in gateway["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") is True
    item = next(i for i in volume["secret"]["items"] if i["path"] == keys_file[len(mount["mountPath"]) + 1 :])
    assert volume["secret"]["secretName"] == "anime2vec-gateway-api-keys" and item["key"] == "api-keys"
    for name, (grpc_port, metrics_port) in PORTS.items():
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {grpc_port, metrics_port}


def _allows(policies: dict, src: str | None, dst: str, port: int, namespace: str | None = None) -> bool:
    """Whether the rendered policies let pods named `src` (or namespace `namespace`) reach `dst` on `port`:
    `dst` must admit it on ingress and, for an in-namespace `src`, `src` must permit it on egress."""

    def selects(selector: dict, name: str) -> bool:
        if not selector:
            return True
        labels = {"app.kubernetes.io/name": name}
        ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
        for e in selector.get("matchExpressions", []):
            ok &= e["operator"] == "In" and labels.get(e["key"]) in e["values"]
        return ok

    def peer_matches(peer: dict, name: str | None) -> bool:
        if "namespaceSelector" in peer:
            return (
                namespace is not None
                and peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name") == namespace
                and name is None
            )
        return name is not None and selects(peer["podSelector"], name)

    def rule_ok(rule: dict, peers_key: str, peer_name: str | None) -> bool:
        ports = rule.get("ports")
        if ports and port not in {p["port"] for p in ports}:
            return False
        peers = rule.get(peers_key)
        return not peers or any(peer_matches(p, peer_name) for p in peers)

    ingress = any(
        rule_ok(r, "from", src)
        for p in policies.values()
        if selects(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"]["policyTypes"]
        for r in p["spec"].get("ingress", [])
    )
    if src is None:
        return ingress
    egress_policies = [
        p for p in policies.values() if selects(p["spec"]["podSelector"], src) and "Egress" in p["spec"]["policyTypes"]
    ]
    egress = any(rule_ok(r, "to", dst) for p in egress_policies for r in p["spec"].get("egress", []))
    return ingress and egress


def test_network_policies_allow_exactly_the_request_paths():
    policies = by_kind("overlays/production", "NetworkPolicy")
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    allowed = [
        ("gateway", "encoder", 50051),
        ("gateway", "ranker", 50052),
        ("ranker", "encoder", 50051),
        ("ranker", "qdrant", 6333),
        ("ranker", "qdrant", 6334),
        ("qdrant", "qdrant", 6335),
    ]
    denied = [
        ("gateway", "qdrant", 6333),
        ("encoder", "ranker", 50052),
        ("encoder", "qdrant", 6333),
        ("ranker", "gateway", 50050),
        ("gateway", "ranker", 9102),
        ("encoder", "gateway", 50050),
    ]
    for src, dst, port in allowed:
        assert _allows(policies, src, dst, port), f"{src} -> {dst}:{port} should be allowed"
    for src, dst, port in denied:
        assert not _allows(policies, src, dst, port), f"{src} -> {dst}:{port} should be denied"
    # Public ingress reaches the gateway's API only; Prometheus reaches metrics ports from `monitoring` only.
    ingress_any = [p for p in policies.values() if any("from" not in r for r in p["spec"].get("ingress", []))]
    assert [p["metadata"]["name"] for p in ingress_any] == ["gateway"]
    assert [pp["port"] for r in policies["gateway"]["spec"]["ingress"] for pp in r["ports"]] == [50050]
    for name, (_, metrics_port) in PORTS.items():
        assert _allows(policies, None, name, metrics_port, namespace="monitoring")
        assert not _allows(policies, None, name, metrics_port, namespace="default")
    # Qdrant: its metrics-only port, never its APIs (tests/deploy/test_qdrant_security.py has the rest).
    assert _allows(policies, None, "qdrant", 9103, namespace="monitoring")
    assert not _allows(policies, None, "qdrant", 6333, namespace="monitoring")


def test_gpu_overlay_puts_the_encoder_on_a_gpu():
    enc = pod_spec(by_kind("overlays/gpu", "Deployment")["encoder"])
    c = enc["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].startswith("ghcr.io/anime2vec/encoder:") and "cuda" in c["image"].split(":")[1]
    assert enc["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in enc["tolerations"])
    assert _env("overlays/gpu", c)["A2V_ENCODER_DEVICE"] == "cuda"
    # Only the encoder needs the GPU.
    for name in ("ranker", "gateway"):
        other = pod_spec(by_kind("overlays/gpu", "Deployment")[name])["containers"][0]
        assert "nvidia.com/gpu" not in other["resources"]["limits"]


def _quantity(q: str | int) -> float:
    """A Kubernetes quantity (\"250m\", \"2\", \"768Mi\", \"1Gi\") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    q = str(q)
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def test_local_overlay_runs_one_of_everything_smaller_than_production():
    production = {o["metadata"]["name"]: o for o in workloads("overlays/production")}
    for obj in workloads("overlays/local"):
        assert obj["spec"]["replicas"] == 1
        big = pod_spec(production[obj["metadata"]["name"]])["containers"][0]["resources"]
        small = pod_spec(obj)["containers"][0]["resources"]
        for part in ("requests", "limits"):
            for res in ("cpu", "memory"):
                assert _quantity(small[part][res]) < _quantity(big[part][res]), (obj["metadata"]["name"], part, res)


def test_production_scales_spreads_and_clusters_qdrant():
    tree = "overlays/production"
    deployments = by_kind(tree, "Deployment")
    hpas = by_kind(tree, "HorizontalPodAutoscaler")
    pdbs = by_kind(tree, "PodDisruptionBudget")
    for name in PORTS:
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == name
        assert hpa["spec"]["minReplicas"] <= deployments[name]["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["minReplicas"] >= 2
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        anti = pod_spec(deployments[name])["affinity"]["podAntiAffinity"]
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}

    q = by_kind(tree, "StatefulSet")["qdrant"]
    assert q["spec"]["replicas"] == 3 and q["spec"]["serviceName"] == "qdrant-headless"
    qc = pod_spec(q)["containers"][0]
    assert {"name": "QDRANT__CLUSTER__ENABLED", "value": "true"} in qc["env"]
    script = qc["args"][0]
    assert '--bootstrap "${scheme}://qdrant-0.qdrant-headless:6335"' in script and "--uri" in script
    assert 'scheme="${A2V_QDRANT_P2P_SCHEME:-http}"' in script  # https under components/tls
    headless = by_kind(tree, "Service")["qdrant-headless"]["spec"]
    assert headless["clusterIP"] == "None" and 6335 in {p["port"] for p in headless["ports"]}
    assert pdbs["qdrant"]["spec"]["maxUnavailable"] == 1
    assert pod_spec(q)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]

    monitors = by_kind(tree, "ServiceMonitor")
    assert monitors["anime2vec"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitors["anime2vec"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["qdrant"]["spec"]["endpoints"][0]["port"] == "metrics"  # 9103, not the REST port
    selected = [
        s
        for s in by_kind(tree, "Service").values()
        if all(
            s["metadata"]["labels"].get(k) == v
            for k, v in monitors["qdrant"]["spec"]["selector"]["matchLabels"].items()
        )
    ]
    assert [s["metadata"]["name"] for s in selected] == ["qdrant"], "one scrape target per Qdrant pod (job=qdrant)"


def test_train_job_writes_to_the_model_store_rankers_read():
    job = by_kind("jobs", "Job")["anime2vec-train"]
    spec = pod_spec(job)
    c = spec["containers"][0]
    assert c["command"][:4] == ["python", "-m", "anime2vec.cli", "train"]
    store = c["command"][c["command"].index("--store") + 1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == store)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "anime2vec-models" and not mount.get("readOnly")
    assert spec["restartPolicy"] == "Never"

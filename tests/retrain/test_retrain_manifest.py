"""The retrain CronJob as rendered by `kubectl kustomize deploy/k8s/jobs`: schedule and overlap,
the same volumes and conventions as the train Job, the shared PostgreSQL store (no ranker volume), and network paths
(together with the production policies: default deny + what the job adds). Strict schema validation
and container hardening of the CronJob are in tests/deploy (it is a workload of the jobs tree)."""

from __future__ import annotations

from tests.deploy.manifests import by_kind, pod_spec
from tests.deploy.test_manifests import _allows


def _cronjob() -> dict:
    return by_kind("jobs", "CronJob")["anime2vec-retrain"]


def test_retrain_runs_nightly_one_at_a_time_like_the_train_job():
    cj = _cronjob()
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *rest = cj["spec"]["schedule"].split()
    assert rest == ["*", "*", "*"] and 0 <= int(hour) < 24 and 0 <= int(minute) < 60  # once a day
    job = cj["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] <= 1 and job["activeDeadlineSeconds"] > 0
    spec, train = pod_spec(cj), pod_spec(by_kind("jobs", "Job")["anime2vec-train"])
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == train["securityContext"]
    c, tc = spec["containers"][0], train["containers"][0]
    assert c["image"] == tc["image"] and c["resources"] == tc["resources"]
    assert c["securityContext"] == tc["securityContext"]
    assert c["command"][:4] == ["python", "-m", "anime2vec.cli", "retrain"]


def test_retrain_reads_the_shared_postgres_store_and_writes_the_model_store():
    cj = pod_spec(_cronjob())
    c = cj["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in cj["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    # the events: the store of record the rankers use (same ConfigMap, same Secret), no ranker volume
    assert "--events" not in c["command"]
    assert {"configMapRef": {"name": "anime2vec-postgres-client"}} in c["envFrom"]
    password = next(e for e in c["env"] if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]
    assert password == {"name": "anime2vec-postgres-app", "key": "password"}
    assert "anime2vec-ranker-data" not in claims.values() and "affinity" not in cj

    store = c["command"][c["command"].index("--store") + 1]
    assert claims[mounts[store]["name"]] == "anime2vec-models" and not mounts[store].get("readOnly")
    assert env["A2V_RANKER_MODEL_STORE"] == store
    assert env["QDRANT_URL"] == "http://qdrant:6333" and env["A2V_PUSHGATEWAY_URL"].endswith(":9091")


def test_retrain_reaches_qdrant_postgres_and_the_pushgateway_only():
    policies = {**by_kind("overlays/production", "NetworkPolicy"), **by_kind("jobs", "NetworkPolicy")}
    job = "anime2vec-retrain"
    for port in (6333, 6334):
        assert _allows(policies, job, "qdrant", port)
    assert _allows(policies, job, "postgres", 5432) and not _allows(policies, job, "postgres", 8000)
    for dst, port in (("ranker", 50052), ("encoder", 50051), ("gateway", 50050), ("qdrant", 6335)):
        assert not _allows(policies, job, dst, port), f"{job} -> {dst}:{port} should be denied"
    assert not _allows(policies, "gateway", "qdrant", 6333)  # the extra Qdrant ingress admits the job only
    push = [r for r in policies["retrain"]["spec"]["egress"] if any(p.get("namespaceSelector") for p in r["to"])]
    assert push == [
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pushgateway"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 9091}],
        }
    ]
    assert "ingress" not in policies["retrain"]["spec"]  # nothing calls the job


def test_release_jobs_reach_qdrant_and_nothing_else():
    """The base's default-deny applies to the index and promote Jobs as well: without their own
    policy they could not reach Qdrant at all."""
    policies = {**by_kind("overlays/production", "NetworkPolicy"), **by_kind("release", "NetworkPolicy")}
    for job in ("anime2vec-index", "anime2vec-promote"):
        for port in (6333, 6334):
            assert _allows(policies, job, "qdrant", port)
        for dst, port in (("ranker", 50052), ("encoder", 50051), ("gateway", 50050), ("qdrant", 6335)):
            assert not _allows(policies, job, dst, port), f"{job} -> {dst}:{port} should be denied"
    assert not _allows(policies, "gateway", "qdrant", 6333)

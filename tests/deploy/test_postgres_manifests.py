"""PostgreSQL, the store of record of every ranker replica, as the trees render it (issue 17): a
CloudNativePG Cluster in every environment (three synchronous instances with backups and metrics in
production), credentials from a Secret only, TLS verified where the overlay has TLS, network
policies that let only the rankers and the retrain job reach its SQL port, and no ranker volume."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import by_kind, pod_spec, render
from tests.deploy.test_manifests import _allows

ENVIRONMENTS = ("overlays/local", "overlays/gpu", "overlays/production", "overlays/production-tls")


def _cluster(tree: str) -> dict:
    return by_kind(tree, "Cluster")["anime2vec-postgres"]


def _client_env(tree: str) -> dict:
    return by_kind(tree, "ConfigMap")["anime2vec-postgres-client"]["data"]


@pytest.mark.parametrize("tree", ENVIRONMENTS)
def test_every_environment_runs_the_store_with_credentials_from_a_secret(tree):
    c = _cluster(tree)
    assert c["apiVersion"] == "postgresql.cnpg.io/v1"
    assert c["spec"]["bootstrap"]["initdb"] == {
        "database": "anime2vec",
        "owner": "anime2vec",
        "secret": {"name": "anime2vec-postgres-app"},
    }
    assert c["spec"]["enableSuperuserAccess"] is False
    assert c["spec"]["inheritedMetadata"]["labels"]["app.kubernetes.io/name"] == "postgres"
    env = _client_env(tree)
    assert env["A2V_RANKER_STORE_DSN"] == "host=anime2vec-postgres-rw port=5432 dbname=anime2vec user=anime2vec"
    for obj in render(tree):  # no password in any ConfigMap or in any container's literal env
        if obj["kind"] == "ConfigMap":
            assert not any("password" in k.lower() or "password=" in str(v) for k, v in obj.get("data", {}).items())
    ranker = pod_spec(by_kind(tree, "Deployment")["ranker"])["containers"][0]
    assert {"configMapRef": {"name": "anime2vec-postgres-client"}} in ranker["envFrom"]
    pw = next(e for e in ranker["env"] if e["name"] == "PGPASSWORD")
    assert pw["valueFrom"]["secretKeyRef"] == {"name": "anime2vec-postgres-app", "key": "password"}
    assert not [
        o
        for o in render(tree)
        if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "anime2vec-ranker-data"
    ], "the rankers keep no volume of their own"


def test_production_runs_three_synchronous_instances_with_backups_and_metrics():
    spec = _cluster("overlays/production")["spec"]
    assert spec["instances"] == 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["monitoring"]["enablePodMonitor"] is True
    store = spec["backup"]["barmanObjectStore"]
    assert (
        store["destinationPath"].startswith("s3://")
        and store["s3Credentials"]["accessKeyId"]["name"] == "anime2vec-postgres-backup"
    )
    nightly = by_kind("overlays/production", "ScheduledBackup")["anime2vec-postgres-nightly"]
    assert nightly["spec"]["cluster"] == {"name": "anime2vec-postgres"}
    assert _cluster("overlays/local")["spec"]["instances"] == 1


def test_tls_overlay_verifies_the_server_and_refuses_plaintext():
    spec = _cluster("overlays/production-tls")["spec"]
    assert spec["certificates"] == {
        "serverTLSSecret": "anime2vec-postgres-tls",
        "serverCASecret": "anime2vec-postgres-tls",
    }
    assert "hostnossl all all all reject" in spec["postgresql"]["pg_hba"]
    assert spec["instances"] == 3 and spec["postgresql"]["synchronous"]["number"] == 1  # production's, kept
    env = _client_env("overlays/production-tls")
    assert env["PGSSLMODE"] == "verify-full"
    ranker = pod_spec(by_kind("overlays/production-tls", "Deployment")["ranker"])
    mount = next(
        m for m in ranker["containers"][0]["volumeMounts"] if env["PGSSLROOTCERT"].startswith(m["mountPath"] + "/")
    )
    volume = next(v for v in ranker["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "anime2vec-postgres-tls"
    assert _client_env("overlays/production")["PGSSLMODE"] == "require"  # the operator's own TLS, unverified


def test_only_the_rankers_and_the_retrain_job_reach_the_sql_port():
    policies = {**by_kind("overlays/production", "NetworkPolicy"), **by_kind("jobs", "NetworkPolicy")}
    assert _allows(policies, "ranker", "postgres", 5432)
    assert _allows(policies, "anime2vec-retrain", "postgres", 5432)
    assert _allows(policies, "postgres", "postgres", 5432)  # replication between instances
    for src in ("gateway", "encoder", "qdrant", "anime2vec-index", "anime2vec-promote"):
        assert not _allows(policies, src, "postgres", 5432), f"{src} -> postgres:5432 should be denied"
    assert _allows(policies, None, "postgres", 9187, namespace="monitoring")
    assert not _allows(policies, None, "postgres", 5432, namespace="monitoring")
    assert not _allows(policies, "ranker", "postgres", 8000)

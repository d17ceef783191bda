"""Render the kustomize trees under deploy/k8s once per test session (kubectl's built-in kustomize)."""

from __future__ import annotations

import functools
import shutil
import subprocess

import yaml

from anime2vec.paths import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
# Every tree an operator applies: the environments (production also with TLS) and the release Jobs.
TREES = ("overlays/local", "overlays/gpu", "overlays/production", "overlays/production-tls", "jobs", "release")
# Prometheus Operator CRDs: kubernetes-validate ships core schemas only, so these kinds are checked
# by the structural tests here, not by the strict schema test.
CRD_KINDS = frozenset({"ServiceMonitor", "Cluster", "ScheduledBackup"})  # + CloudNativePG (postgresql.cnpg.io)
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "Job", "CronJob"})
SERVICE_UID = 10001


@functools.cache
def render(tree: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize deploy/k8s/<tree>` prints; fails with kubectl's own message."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise AssertionError("kubectl is not installed; the deploy tests render manifests with `kubectl kustomize`")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {tree} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def by_kind(tree: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(tree) if o["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":  # the pod template of the Jobs it creates
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def workloads(tree: str) -> list[dict]:
    return [o for o in render(tree) if o["kind"] in WORKLOAD_KINDS]

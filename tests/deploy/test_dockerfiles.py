"""The service images, read statically (docker is not available in CI): pinned bases, a non-root
user whose uid is the one the manifests run as, the ports the manifests probe, generated protos."""

from __future__ import annotations

import re

import pytest

from anime2vec.paths import REPO_ROOT
from tests.deploy.manifests import SERVICE_UID, by_kind, pod_spec

DOCKERFILES = {
    "services/encoder/Dockerfile": ("encoder", (50051, 9101)),
    "services/encoder/Dockerfile.cuda": ("encoder", (50051, 9101)),
    "services/ranker/Dockerfile": ("ranker", (50052, 9102)),
    "services/gateway/Dockerfile": ("gateway", (50050, 9100)),
}
PINNED_BASES = (
    re.compile(r"python:3\.11\.\d+-slim-bookworm"),
    re.compile(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu22\.04"),
)


def _instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / path).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_is_pinned_non_root_and_exposes_the_manifest_ports(path):
    service, ports = DOCKERFILES[path]
    ins = _instructions(path)
    froms = [args.split()[0] for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, f"{path}: expected a multi-stage build"
    for image in froms:
        assert any(p.fullmatch(image) for p in PINNED_BASES), f"{path}: base {image!r} is not an exact pinned tag"
    assert "python:3.11.7-slim-bookworm" in froms or "cuda" in path

    final_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    users = [args for word, args in final_stage if word == "USER"]
    assert users, f"{path}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid == str(SERVICE_UID), f"{path}: USER {uid} but the manifests run as {SERVICE_UID}"
    manifest_uid = pod_spec(by_kind("overlays/local", "Deployment")[service])["securityContext"]["runAsUser"]
    assert int(uid) == manifest_uid

    exposed = {int(p.split("/")[0]) for word, args in final_stage if word == "EXPOSE" for p in args.split()}
    assert exposed == set(ports), f"{path}: EXPOSE {sorted(exposed)} != {sorted(ports)}"
    container = pod_spec(by_kind("overlays/local", "Deployment")[service])["containers"][0]
    assert exposed == {p["containerPort"] for p in container["ports"]}

    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "make proto" in runs, f"{path}: the gRPC code must be generated at build time"
    env = " ".join(args for word, args in final_stage if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    entry = next(args for word, args in reversed(final_stage) if word == "ENTRYPOINT")
    assert f"services.{service}.server" in entry


def test_images_in_the_manifests_are_the_ones_these_dockerfiles_build():
    for service in ("encoder", "ranker", "gateway"):
        image = pod_spec(by_kind("overlays/local", "Deployment")[service])["containers"][0]["image"]
        assert image.startswith(f"ghcr.io/anime2vec/{service}:")
        comment = (REPO_ROOT / f"services/{service}/Dockerfile").read_text()
        assert f"-t {image} ." in comment, f"the Dockerfile's build command should tag {image}"
    gpu_image = pod_spec(by_kind("overlays/gpu", "Deployment")["encoder"])["containers"][0]["image"]
    assert f"-t {gpu_image} ." in (REPO_ROOT / "services/encoder/Dockerfile.cuda").read_text()

"""The service images, read statically (docker is not available in CI): pinned bases, a non-root
user whose uid is the one the manifests run as, the ports the manifests probe, generated protos.
services/Dockerfile builds the three CPU images, one target each; the GPU encoder has its own file."""

from __future__ import annotations

import re

import pytest

from anime2vec.paths import REPO_ROOT
from tests.deploy.manifests import SERVICE_UID, by_kind, pod_spec

SERVICES_DOCKERFILE = "services/Dockerfile"
CUDA_DOCKERFILE = "services/encoder/Dockerfile.cuda"
# (file, target) -> (service, ports); target None: the file's last stage
IMAGES = {
    (SERVICES_DOCKERFILE, "encoder"): ("encoder", (50051, 9101)),
    (SERVICES_DOCKERFILE, "ranker"): ("ranker", (50052, 9102)),
    (SERVICES_DOCKERFILE, "gateway"): ("gateway", (50050, 9100)),
    (CUDA_DOCKERFILE, None): ("encoder", (50051, 9101)),
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


def _stages(ins: list[tuple[str, str]]) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(base, name, instructions) per build stage, in file order."""
    stages: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for word, args in ins:
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append((parts[0], name, []))
        elif stages:
            stages[-1][2].append((word, args))
    return stages


def _image(path: str, target: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """What one built image is made of: the external bases of all stages, and the instructions of
    its target stage preceded by those of the stages it is built FROM (in build order)."""
    stages = _stages(_instructions(path))
    named = {name: (base, body) for base, name, body in stages if name}
    stage = stages[-1] if target is None else next(st for st in stages if st[1] == target)
    chain = []
    base, _, body = stage
    while True:
        chain[:0] = body
        if base not in named:
            break
        base, body = named[base]
    return [b for b, _, _ in stages if b not in named], chain


def test_the_service_images_come_from_one_dockerfile():
    """One file, one target per service; no per-service copies left to drift apart."""
    targets = {name for _, name, _ in _stages(_instructions(SERVICES_DOCKERFILE))}
    assert {"encoder", "ranker", "gateway"} <= targets
    assert sorted(p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("services/**/Dockerfile*")) == sorted(
        [SERVICES_DOCKERFILE, f"{SERVICES_DOCKERFILE}.dockerignore", CUDA_DOCKERFILE, f"{CUDA_DOCKERFILE}.dockerignore"]
    )


@pytest.mark.parametrize("path,target", IMAGES)
def test_dockerfile_is_pinned_non_root_and_exposes_the_manifest_ports(path, target):
    service, ports = IMAGES[path, target]
    bases, final_stage = _image(path, target)
    ins = _instructions(path)
    assert len(_stages(ins)) >= 2, f"{path}: expected a multi-stage build"
    for image in bases:
        assert any(p.fullmatch(image) for p in PINNED_BASES), f"{path}: base {image!r} is not an exact pinned tag"
    assert "python:3.11.7-slim-bookworm" in bases or "cuda" in path

    users = [args for word, args in final_stage if word == "USER"]
    assert users, f"{path} {target}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid == str(SERVICE_UID), f"{path}: USER {uid} but the manifests run as {SERVICE_UID}"
    manifest_uid = pod_spec(by_kind("overlays/local", "Deployment")[service])["securityContext"]["runAsUser"]
    assert int(uid) == manifest_uid

    exposed = {int(p.split("/")[0]) for word, args in final_stage if word == "EXPOSE" for p in args.split()}
    assert exposed == set(ports), f"{path} {target}: EXPOSE {sorted(exposed)} != {sorted(ports)}"
    container = pod_spec(by_kind("overlays/local", "Deployment")[service])["containers"][0]
    assert exposed == {p["containerPort"] for p in container["ports"]}

    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "make proto" in runs, f"{path}: the gRPC code must be generated at build time"
    env = " ".join(args for word, args in final_stage if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    entry = [args for word, args in final_stage if word == "ENTRYPOINT"]
    assert entry and f"services.{service}.server" in entry[-1]


def test_images_in_the_manifests_are_the_ones_these_dockerfiles_build():
    comment = (REPO_ROOT / SERVICES_DOCKERFILE).read_text()
    for service in ("encoder", "ranker", "gateway"):
        image = pod_spec(by_kind("overlays/local", "Deployment")[service])["containers"][0]["image"]
        assert image.startswith(f"ghcr.io/anime2vec/{service}:")
        assert f"--target {service} -t {image} ." in comment, f"the Dockerfile's build command should tag {image}"
    gpu_image = pod_spec(by_kind("overlays/gpu", "Deployment")["encoder"])["containers"][0]["image"]
    assert f"-t {gpu_image} ." in (REPO_ROOT / CUDA_DOCKERFILE).read_text()

"""Images by digest (README "Images by digest"): Qdrant everywhere by a real digest; every image of
the trees a production cluster runs by digest, the project's own written at release by
`deploy/pin_images.py resolve` (until then a placeholder that `check`, and the kubelet, refuse);
the laptop overlays keep the project's images by tag (`kind load` images have no registry digest).
`resolve` and `check` run here as the release runs them, with a stand-in `crane` on PATH."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from anime2vec.paths import REPO_ROOT
from tests.deploy.manifests import K8S, TREES, render

SCRIPT = REPO_ROOT / "deploy" / "pin_images.py"
COMPONENT = K8S / "components" / "release-images" / "kustomization.yaml"
PRODUCTION_TREES = ("overlays/production", "overlays/production-tls", "jobs", "release")
LAPTOP_TREES = ("overlays/local", "overlays/gpu")
OWN = "ghcr.io/anime2vec/"
PLACEHOLDER = "sha256:unresolved"
PINNED = re.compile(r"(?P<name>[^@:\s]+(?::\d+)?/[^@:\s]+)(?::(?P<tag>[\w.-]+))?@(?P<digest>sha256:[0-9a-f]{64})")


def _images(tree: str) -> set[str]:
    out = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("initContainers", "containers") and isinstance(v, list):
                    out.update(c["image"] for c in v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in render(tree):
        walk(obj)
    return out


def _component_images() -> dict[str, dict]:
    return {i["name"]: i for i in yaml.safe_load(COMPONENT.read_text())["images"]}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env or os.environ.copy()
    )


def test_third_party_images_carry_a_real_digest_in_every_tree():
    refs = {image for tree in TREES for image in _images(tree) if not image.startswith(OWN)}
    assert refs, "expected Qdrant's image"
    for image in refs:
        assert PINNED.fullmatch(image), f"{image} is not pinned by digest"
    assert len(refs) == 1, f"one Qdrant image everywhere, not {sorted(refs)}"


def test_production_trees_reference_every_image_by_digest():
    component = _component_images()
    for tree in PRODUCTION_TREES:
        for image in _images(tree):
            name_tag, at, digest = image.partition("@")
            assert at, f"{tree}: {image} is referenced by tag only"
            if image.startswith(OWN):
                name, _, tag = name_tag.rpartition(":")
                entry = component.get(name)
                assert entry is not None, f"{tree}: {name} is not in {COMPONENT.relative_to(REPO_ROOT)}"
                assert (tag, digest) == (str(entry["newTag"]), entry["digest"]), f"{tree}: {image}"
                assert digest == PLACEHOLDER or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{tree}: {image}"
            else:
                assert PINNED.fullmatch(image), f"{tree}: {image}"


def test_laptop_overlays_run_the_project_images_by_tag():
    for tree in LAPTOP_TREES:
        own = [i for i in _images(tree) if i.startswith(OWN)]
        assert own and all("@" not in i for i in own), f"{tree}: {own}"


def test_check_refuses_every_container_without_a_real_digest():
    unresolved = sorted(n for n, i in _component_images().items() if i["digest"] == PLACEHOLDER)
    proc = _run("check")
    refused = [line for line in proc.stdout.splitlines() if line.startswith("UNPINNED ")]
    assert proc.returncode == (1 if unresolved else 0), proc.stdout + proc.stderr
    assert {re.search(r"(ghcr\.io/anime2vec/[a-z]+):", line)[1] for line in refused} == set(unresolved)
    assert all("digest not resolved yet" in line and "pin_images.py resolve" in line for line in refused)

    proc = _run("check", "overlays/local")  # by tag: refused, each container named
    assert proc.returncode == 1
    assert {line.split(": ")[1] for line in proc.stdout.splitlines() if line.startswith("UNPINNED")} == {
        "Deployment/encoder container encoder",
        "Deployment/gateway container gateway",
        "Deployment/ranker container ranker",
    }
    assert "not pinned by digest" in proc.stdout


def _stand_in_crane(bin_dir, fail_for: str = "", garbage: bool = False) -> None:
    """`crane digest REF` printing sha256(REF) (or garbage, or failing for one name), logging each REF."""
    bin_dir.mkdir()
    crane = bin_dir / "crane"
    crane.write_text(f"""#!{sys.executable}
import hashlib, sys
assert sys.argv[1] == "digest", sys.argv
ref = sys.argv[2]
open({str(bin_dir / "asked")!r}, "a").write(ref + "\\n")
if {fail_for!r} and ref.startswith({fail_for!r}):
    sys.exit("MANIFEST_UNKNOWN: manifest unknown")
print("not-a-digest" if {garbage!r} else "sha256:" + hashlib.sha256(ref.encode()).hexdigest())
""")
    crane.chmod(0o755)


def _copy(tmp_path):
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    return root


def test_resolve_writes_the_registry_digests_that_check_then_accepts(tmp_path):
    root = _copy(tmp_path)
    _stand_in_crane(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = _run("--k8s", str(root), "resolve", "--tag", "9.9.9", env=env)
    assert proc.returncode == 0, proc.stderr
    asked = (tmp_path / "bin" / "asked").read_text().split()
    assert sorted(asked) == sorted(f"{name}:9.9.9" for name in _component_images())

    proc = _run("--k8s", str(root), "check", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("every one by digest") == len(PRODUCTION_TREES)
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(root / "overlays/production")], capture_output=True, text=True, check=True
    ).stdout
    for name in _component_images():
        digest = hashlib.sha256(f"{name}:9.9.9".encode()).hexdigest()
        assert f"image: {name}:9.9.9@sha256:{digest}" in rendered


def test_resolve_takes_given_digests_without_asking_the_registry(tmp_path):
    root = _copy(tmp_path)
    digests = {name: "sha256:" + hashlib.sha256(name.encode()).hexdigest() for name in _component_images()}
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            p for p in os.environ["PATH"].split(os.pathsep) if not (p and os.path.exists(os.path.join(p, "crane")))
        ),
    }
    args = [a for name, d in digests.items() for a in ("--digest", f"{name}={d}")]
    proc = _run("--k8s", str(root), "resolve", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    written = {i["name"]: i for i in yaml.safe_load((root / COMPONENT.relative_to(K8S)).read_text())["images"]}
    assert {n: i["digest"] for n, i in written.items()} == digests
    assert {str(i["newTag"]) for i in written.values()} == {str(i["newTag"]) for i in _component_images().values()}


@pytest.mark.parametrize("case", ["registry refuses one image", "not a digest", "unknown image", "no crane"])
def test_resolve_writes_nothing_unless_every_image_resolves(tmp_path, case):
    root = _copy(tmp_path)
    component = root / COMPONENT.relative_to(K8S)
    before = component.read_text()
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not (p and os.path.exists(os.path.join(p, "crane")))]
    args = ["--tag", "9.9.9"]
    if case == "registry refuses one image":
        _stand_in_crane(tmp_path / "bin", fail_for="ghcr.io/anime2vec/gateway")
    elif case == "not a digest":
        _stand_in_crane(tmp_path / "bin", garbage=True)
    elif case == "unknown image":
        _stand_in_crane(tmp_path / "bin")
        args += ["--digest", "ghcr.io/anime2vec/nope=sha256:" + "0" * 64]
    if (tmp_path / "bin").exists():
        path.insert(0, str(tmp_path / "bin"))
    proc = _run("--k8s", str(root), "resolve", *args, env={**os.environ, "PATH": os.pathsep.join(path)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    expected = {
        "registry refuses one image": "MANIFEST_UNKNOWN",
        "not a digest": "is not a sha256 digest",
        "unknown image": "ghcr.io/anime2vec/nope",
        "no crane": "`crane`",
    }[case]
    assert expected in proc.stderr
    assert component.read_text() == before

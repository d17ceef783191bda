#!/usr/bin/env python3
"""Images by digest for the trees a production cluster runs (README "Images by digest").

  python deploy/pin_images.py resolve --tag 0.2.0      # after pushing the images: write their digests
  python deploy/pin_images.py resolve --digest ghcr.io/anime2vec/ranker=sha256:...   # digests you already have
  python deploy/pin_images.py check                    # before applying: every image by digest, or exit 1

`resolve` rewrites deploy/k8s/components/release-images/kustomization.yaml (the project's images:
name, tag, digest), asking the registry with `crane digest NAME:TAG` for every image not given with
--digest. It writes nothing unless every image resolved to a sha256 digest.

`check` renders each tree with `kubectl kustomize` and refuses (exit 1, one line per container) any
image that is not `NAME[:TAG]@sha256:<64 hex digits>`: a bare tag, or the placeholder
sha256:unresolved the component holds until the release step has run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent / "k8s"
COMPONENT = Path("components/release-images/kustomization.yaml")  # under the k8s root
PRODUCTION_TREES = ("overlays/production", "overlays/production-tls", "jobs", "release")
PLACEHOLDER = "sha256:unresolved"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
PINNED = re.compile(r"[^@\s]+@(sha256:[0-9a-f]{64})")
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


class PinError(Exception):
    pass


# ---- resolve --------------------------------------------------------------------------------------


def _entries(text: str) -> list[dict]:
    images = (yaml.safe_load(text) or {}).get("images") or []
    if not images or any(not {"name", "newTag", "digest"} <= set(i) for i in images):
        raise PinError("the component must list images with name, newTag and digest")
    return images


def crane_digest(ref: str) -> str:
    crane = shutil.which("crane")
    if crane is None:
        raise PinError(
            f"cannot resolve {ref}: `crane` (go-containerregistry) is not installed; "
            "install it or pass --digest NAME=sha256:... (e.g. from `docker buildx build --push "
            "--metadata-file`)"
        )
    proc = subprocess.run([crane, "digest", ref], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise PinError(f"crane digest {ref} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve(component: Path, tag: str | None, given: dict[str, str]) -> list[tuple[str, str, str]]:
    """Rewrite `component` with a digest (and `tag`, when given) for each image; returns
    (name, tag, digest) rows. All or nothing: raises PinError, file untouched, on any failure."""
    text = component.read_text()
    images = _entries(text)
    names = {i["name"] for i in images}
    unknown = sorted(set(given) - names)
    if unknown:
        raise PinError(
            f"--digest for images the component does not list: {', '.join(unknown)} "
            f"(it lists {', '.join(sorted(names))})"
        )
    rows = []
    for image in images:
        name, new_tag = image["name"], str(tag or image["newTag"])
        digest = given.get(name) or crane_digest(f"{name}:{new_tag}")
        if not DIGEST.fullmatch(digest):
            raise PinError(f"{name}:{new_tag}: {digest!r} is not a sha256 digest (sha256:<64 hex digits>)")
        rows.append((name, new_tag, digest))
    for name, new_tag, digest in rows:
        line = re.compile(
            r"^(\s*- \{name: " + re.escape(name) + r", newTag: )[^,]+(, digest: )\"[^\"]*\"(\})\s*$", re.MULTILINE
        )
        text, n = line.subn(lambda m: f'{m[1]}"{new_tag}"{m[2]}"{digest}"{m[3]}', text)
        if n != 1:
            raise PinError(
                f'{component}: expected one line `- {{name: {name}, newTag: ..., digest: "..."}}`, found {n}'
            )
    written = {i["name"]: (str(i["newTag"]), i["digest"]) for i in _entries(text)}
    assert written == {n: (t, d) for n, t, d in rows}, "rewritten component does not read back"
    component.write_text(text)
    return rows


# ---- check ----------------------------------------------------------------------------------------


def render(tree_dir: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise PinError("kubectl is not installed (the check renders the trees with `kubectl kustomize`)")
    proc = subprocess.run([kubectl, "kustomize", str(tree_dir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise PinError(f"kubectl kustomize {tree_dir} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _containers(node):
    """(list name, container) for every container anywhere in an object (any workload kind)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONTAINER_LISTS and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        yield key, c
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def unpinned(objects: list[dict]) -> list[tuple[str, str, str]]:
    """(object, container, reason) for every image not referenced by a sha256 digest."""
    bad = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for key, c in _containers(obj):
            image = c["image"]
            if PINNED.fullmatch(image):
                continue
            if image.endswith("@" + PLACEHOLDER):
                reason = f"{image}: digest not resolved yet (run `python deploy/pin_images.py resolve --tag <version>`)"
            else:
                reason = f"{image}: not pinned by digest (NAME[:TAG]@sha256:<64 hex digits>)"
            bad.append((where, f"{key[:-1]} {c['name']}", reason))
    return bad


def check(k8s: Path, trees: list[str]) -> int:
    failed = 0
    for tree in trees:
        objects = render(k8s / tree)
        bad = unpinned(objects)
        images = {c["image"] for obj in objects for _, c in _containers(obj)}
        if bad:
            failed += len(bad)
            for where, container, reason in bad:
                print(f"UNPINNED {tree}: {where} {container}: {reason}")
        else:
            print(f"ok {tree}: {len(images)} image(s), every one by digest")
    if failed:
        print(f"refused: {failed} container image(s) without a digest", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pin_images.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--k8s", type=Path, default=K8S, help="the kustomize root (default: deploy/k8s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve", help="write the project's image digests into the release-images component")
    r.add_argument("--tag", help="the version tag to pin (default: the component's current newTag)")
    r.add_argument(
        "--digest",
        action="append",
        default=[],
        metavar="NAME=sha256:...",
        help="a digest you already have (repeatable); the others are asked with `crane digest`",
    )
    c = sub.add_parser("check", help="refuse any image without a digest in the given trees")
    c.add_argument(
        "trees",
        nargs="*",
        default=list(PRODUCTION_TREES),
        help=f"trees under the kustomize root (default: {' '.join(PRODUCTION_TREES)})",
    )
    a = p.parse_args(argv)
    try:
        if a.cmd == "resolve":
            given = {}
            for item in a.digest:
                name, sep, digest = item.partition("=")
                if not sep:
                    raise PinError(f"--digest {item!r}: expected NAME=sha256:...")
                given[name] = digest
            for name, tag, digest in resolve(a.k8s / COMPONENT, a.tag, given):
                print(f"{name}:{tag}@{digest}")
            return 0
        return check(a.k8s, a.trees)
    except PinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

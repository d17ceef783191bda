"""The README and docs/ point only at things that exist: every relative link resolves to a file and, when
it names a section, to a heading of that file; every repository path written in backticks exists, or
starts existing ones when a glob follows (a file moved without its references fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anime2vec.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:anime2vec|services|tests|bench|deploy|protos|reports|docs)/[A-Za-z0-9_./-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _names(paths):
    return [str(p.relative_to(REPO_ROOT)) for p in paths]


@pytest.mark.parametrize("doc", DOCS, ids=_names(DOCS))
def test_links_resolve(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(REPO_ROOT)}")
    assert not broken, broken


@pytest.mark.parametrize("doc", DOCS, ids=_names(DOCS))
def test_repository_paths_exist(doc: Path):
    missing = sorted(
        {
            p
            for p in REPO_PATH.findall(doc.read_text())
            if not (REPO_ROOT / p.rstrip("/.")).exists() and not any(REPO_ROOT.glob(p + "*"))
        }
    )
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_slugs_follow_github():
    assert slug("Qdrant: keys, TLS, metrics") == "qdrant-keys-tls-metrics"
    assert slug("`make run`") == "make-run"
    assert slug("Any RPC as JSON: `client call` (or grpcurl)") == "any-rpc-as-json-client-call-or-grpcurl"

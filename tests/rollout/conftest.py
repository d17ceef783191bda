"""Rollout fixtures: one small sample bundle (tiny-random encoder, 2 epochs) trained through the CLI
once per session as version A, and version B derived from it as a properly checksummed bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anime2vec.bundle import load_bundle, write_bundle
from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV
from tests.faults.ranker_harness import train_tiny_bundle

TRAIN_TIMEOUT_S = 600


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anime2vec.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=os.environ | OFFLINE_ENV,
        timeout=timeout,
    )


def derive_bundle(src: Path, store: Path, version: str, seed: int) -> Path:
    """A new bundle version with the same catalogue and slightly perturbed item factors: the
    hybrid's collaborative item vectors (so its served item vectors differ) and the WMF fallback's,
    written through write_bundle: checksummed like any other."""
    b = load_bundle(src)
    rng = np.random.default_rng(seed)
    arrays = {k: v for k, v in b.arrays.items() if not k.startswith("train_")}
    for k in ("wmf_V", "hybrid.q"):
        arrays[k] = (b.arrays[k] * (1 + 0.01 * rng.standard_normal(b.arrays[k].shape))).astype(b.arrays[k].dtype)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "format", "version", "created_at")}
    extra = {
        rel: (src / rel).read_bytes()
        for rel in b.manifest["files"]
        if not rel.startswith("arrays/") and rel != "catalog.jsonl"
    }
    return write_bundle(store, manifest, b.catalog, arrays, b.train, version=version, extra_files=extra)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """(A, B) in one store."""
    root = tmp_path_factory.mktemp("rollout")
    store = root / "models"
    a = train_tiny_bundle(root)
    return a, derive_bundle(a, store, "b-" + a.name, seed=1)

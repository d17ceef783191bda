"""Default locations, all relative to the repository root so a fresh clone works as is."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """`A2V_DATA_DIR`, else `../shared/data/mal` beside the checkout."""
    return Path(os.environ.get("A2V_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "mal")).resolve()


def default_cache_dir() -> Path:
    """Encoding cache and other recomputable artefacts (`A2V_CACHE_DIR`, default `.cache/`)."""
    return Path(os.environ.get("A2V_CACHE_DIR", REPO_ROOT / ".cache")).resolve()


def default_model_store() -> Path:
    """Where training writes immutable bundles (`A2V_MODEL_STORE`, default `models/`)."""
    return Path(os.environ.get("A2V_MODEL_STORE", REPO_ROOT / "models")).resolve()

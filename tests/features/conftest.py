"""Shared fixtures: the real MiniLM encoder (loaded once) and the sample catalogue, read directly."""

from __future__ import annotations

import os

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from anime2vec.paths import default_data_dir  # noqa: E402

SAMPLE_CSV = default_data_dir() / "sample" / "anime_sample.csv"


@pytest.fixture(scope="session")
def sample_anime() -> pd.DataFrame:
    if not SAMPLE_CSV.is_file():
        pytest.skip(f"{SAMPLE_CSV} not found (set A2V_DATA_DIR)")
    return pd.read_csv(SAMPLE_CSV, keep_default_na=False)


@pytest.fixture(scope="session")
def real_encoder():
    from anime2vec.features.encoder import TextEncoder

    return TextEncoder(device="cpu")

"""`make run` wiring: a bundle trained on a pre-trained encoder gets that encoder in the encoder service."""

import json
from pathlib import Path

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import bundle_encoder_dir, standard_specs


def _bundle(tmp_path: Path, model_dir) -> Path:
    b = tmp_path / "v1"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({"encoder": {"name": "x", "model_dir": model_dir}}))
    return b


def _encoder_env(model_dir):
    specs = standard_specs("127.0.0.1", {"encoder": (1, 2), "ranker": (3, 4), "gateway": (5, 6)},
                           encoder_model="minilm", model_store=Path("/s"), bundle="v1",
                           ranker_data_dir=Path("/d"), gateway_env={}, encoder_model_dir=model_dir)
    return next(s for s in specs if s.name == "encoder").env


def test_the_bundles_encoder_directory_reaches_the_encoder_service(tmp_path):
    rel = bundle_encoder_dir(_bundle(tmp_path, "models/encoders/minilm-mal-mlm"))
    assert rel == REPO_ROOT / "models/encoders/minilm-mal-mlm"
    assert _encoder_env(rel) == {"MODEL": "minilm", "MODEL_DIR": str(rel)}


def test_stock_minilm_bundles_and_unreadable_manifests_keep_the_default(tmp_path):
    assert bundle_encoder_dir(_bundle(tmp_path, None)) is None
    assert bundle_encoder_dir(tmp_path / "missing") is None
    assert _encoder_env(None) == {"MODEL": "minilm"}

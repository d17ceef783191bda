"""Training a candidate bundle on the base data plus feedback, with the standard pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.dataset import Dataset

if TYPE_CHECKING:
    from ..pipeline import TrainConfig

from .dataset_hook import extend_dataset
from .events import FeedbackData


def train_candidate(cfg: TrainConfig, fb: FeedbackData, report_dir: Path | None = None) -> tuple[Path, Dataset]:
    """Train and export a candidate on the base data plus the feedback interactions, with the
    standard pipeline (selection on validation, the standard protocol on test into the manifest)."""
    from ..pipeline import SERVING_MODEL, evaluate, export_bundle, fit_models, prepare

    cfg = dataclasses.replace(cfg, models=tuple(dict.fromkeys((*cfg.models, "wmf", SERVING_MODEL))))
    p = prepare(cfg, extend_dataset=lambda ds: extend_dataset(ds, fb.interactions))
    # the bundle's data fingerprint covers the events it learnt from
    fp = hashlib.sha256(f"{p.data.fingerprint}:{fb.fingerprint}".encode()).hexdigest()
    p.data = dataclasses.replace(
        p.data,
        fingerprint=fp,
        source=f"{p.data.source}+feedback",
        files={**p.data.files, "feedback.sqlite (events)": fb.fingerprint},
    )
    models, selection = fit_models(p)
    results = evaluate(p, models, split="test")
    selection["retrain"] = fb.describe()
    if report_dir is not None:
        from ..evaluation.report import write_report

        write_report(
            results,
            report_dir,
            title="anime2vec retrain candidate",
            command="anime2vec retrain",
            dataset_description={**p.ds.describe(), "data_source": p.data.source},
        )
    return export_bundle(p, models, selection, results), p.ds


def base_dataset(cfg: TrainConfig):
    """(MalData, the base split dataset) exactly as `pipeline.prepare` builds them."""
    from ..data.dataset import build_dataset
    from ..data.loader import load_mal

    data = load_mal(cfg.data_dir, sample=cfg.sample)
    return data, build_dataset(data.catalog, data.interactions, seed=cfg.seed, split=cfg.split)

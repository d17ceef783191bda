"""A small real bundle for tests that need one but not the e2e suite's MiniLM bundle: the sample
data, the tiny-random encoder, one setting per grid (about 20 s on one core)."""

from __future__ import annotations

from pathlib import Path

from anime2vec.pipeline import SERVING_MODEL, TrainConfig, evaluate, export_bundle, fit_models, prepare


def fast_config(store: Path, cache: Path) -> TrainConfig:
    return TrainConfig(
        sample=True,
        encoder="tiny-random",
        progress=False,
        store=store,
        cache_dir=cache,
        models=("popularity", "wmf", SERVING_MODEL),
        val_queries=50,
        wmf_grid=({"factors": 32, "regularization": 0.05, "alpha": 10.0},),
        ease_lambdas=(300.0,),
        bilinear_grid=({"lam": 10.0, "mu": 10.0},),
    )


def train_fast_bundle(cfg: TrainConfig) -> Path:
    """Train and export the bundle `cfg` describes; its path."""
    p = prepare(cfg)
    models, selection = fit_models(p)
    return export_bundle(p, models, selection, evaluate(p, models))

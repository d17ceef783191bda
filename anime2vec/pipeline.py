"""The offline pipeline: data → splits → content features → WMF → DropoutNet → evaluation → bundle.

Every step is a function of a `TrainConfig`, seeded, and selection happens on the validation
split only; the test split is touched once, by the final `Experiment`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data.dataset import Dataset, build_dataset
from .data.loader import load_mal
from .data.text import RECIPES, build_texts
from .data.types import MalData
from .evaluation.metrics import recall_at_k
from .evaluation.protocol import Experiment, Scenario, scenarios
from .features.cache import EncodingCache, encode_cached
from .features.encoder import TextEncoder
from .features.tfidf import TfidfFeatures
from .features.whiten import Whitener
from .models.base import Queries, Recommender
from .models.content_knn import ContentKNN
from .models.dropoutnet import DropoutNet, DropoutNetConfig
from .models.hybrid import Hybrid
from .models.itemknn import ItemKNN
from .models.popularity import Popularity
from .models.wmf import WMF
from .paths import REPO_ROOT, default_cache_dir, default_model_store

log = logging.getLogger(__name__)

SERVING_MODEL = "anime2vec-hybrid"
ALL_MODELS = ("popularity", "item-knn", "wmf", "content-knn-tfidf", "content-knn-minilm",
              "dropoutnet-tfidf", "dropoutnet-minilm", "anime2vec-hybrid")


@dataclass
class TrainConfig:
    data_dir: Path | None = None
    sample: bool = False
    seed: int = 0
    recipe: str = "default"
    encoder: str = "minilm"              # "minilm" (real weights) or "tiny-random" (plumbing tests)
    whiten: str = "center"               # see features/whiten.py
    cache_dir: Path = field(default_factory=default_cache_dir)
    store: Path = field(default_factory=default_model_store)
    models: tuple[str, ...] = ALL_MODELS
    wmf_grid: tuple[dict, ...] = (
        {"factors": 32, "regularization": 0.05, "alpha": 10.0},
        {"factors": 64, "regularization": 0.05, "alpha": 10.0},
        {"factors": 64, "regularization": 0.5, "alpha": 20.0},
        {"factors": 128, "regularization": 0.05, "alpha": 10.0},
    )
    wmf_iterations: int = 15
    dropoutnet: DropoutNetConfig = field(default_factory=DropoutNetConfig)
    val_queries: int = 600               # per validation scenario (selection)
    test_queries: int | None = None      # None: every test query
    progress: bool = True

    def describe(self) -> dict:
        d = asdict(self)
        d["dropoutnet"] = self.dropoutnet.to_dict()
        for k in ("data_dir", "cache_dir", "store"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["models"] = list(self.models)
        d["wmf_grid"] = list(self.wmf_grid)
        return d


@dataclass
class Prepared:
    config: TrainConfig
    data: MalData
    ds: Dataset
    catalog: pd.DataFrame                # rows aligned to ds.item_ids
    texts: list[str]
    tfidf: TfidfFeatures
    tfidf_sparse: sp.csr_matrix
    tfidf_dense: np.ndarray
    encoder: TextEncoder
    minilm_raw: np.ndarray
    whitener: Whitener
    minilm: np.ndarray                   # whitened, L2-normalised
    timings: dict = field(default_factory=dict)


@contextmanager
def _step(timings: dict, name: str):
    """Log a pipeline step's start and end, and record its seconds (progress for long runs)."""
    start = time.perf_counter()
    log.info("▶ %s", name)
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log.info("✔ %s (%.1f s)", name, timings[name])


def make_encoder(kind: str) -> TextEncoder:
    if kind == "minilm":
        return TextEncoder()
    if kind == "tiny-random":
        return TextEncoder.tiny_random(seed=0)
    raise ValueError(f"unknown encoder {kind!r} (minilm | tiny-random)")


def prepare(cfg: TrainConfig) -> Prepared:
    """Load data, cut the splits, build both content representations (cached encodings)."""
    t: dict = {}
    with _step(t, "load data"):
        data = load_mal(cfg.data_dir, sample=cfg.sample)
    with _step(t, "build splits"):
        ds = build_dataset(data.catalog, data.interactions, seed=cfg.seed)
        catalog = data.catalog.loc[ds.item_ids]
        texts = build_texts(catalog, RECIPES.get(cfg.recipe, cfg.recipe)).tolist()
    with _step(t, "tf-idf"):
        tfidf = TfidfFeatures(svd_dim=min(300, max(2, len(texts) // 4)), seed=cfg.seed)
        tf_sparse = tfidf.fit_transform(texts)
        tf_dense = tfidf.dense(tf_sparse)
    with _step(t, "encode (cached)"):
        encoder = make_encoder(cfg.encoder)
        with EncodingCache(Path(cfg.cache_dir) / "encodings.sqlite") as cache:
            raw = encode_cached(encoder, texts, cache, progress=cfg.progress)
            t["encode_cache"] = {"hits": cache.last_stats.hits, "encoded": cache.last_stats.encoded}
    with _step(t, "whiten"):
        # statistics from training items only: val/test items are unseen at training time
        whitener = Whitener.fit(raw[ds.train_items], mode=cfg.whiten)
        minilm = whitener.transform(raw)
    return Prepared(cfg, data, ds, catalog, texts, tfidf, tf_sparse, tf_dense, encoder, raw,
                    whitener, minilm, t)


# ---- selection on the validation split ---------------------------------------------------
def _val_scenarios(p: Prepared) -> list[Scenario]:
    wanted = ("cold_whole", "warm", "fav_k5")
    sc = scenarios(p.ds, split="val", fav_ks=(5,), seed=p.config.seed, max_queries=p.config.val_queries)
    return [s for s in sc if s.name in wanted]


def val_recall(model: Recommender, scs: list[Scenario], k: int = 100) -> dict[str, float]:
    out = {}
    for s in scs:
        recs, _ = model.recommend(s.queries, k, items=s.candidates, exclude=s.exclude)
        out[s.name] = recall_at_k(recs, s.truth, k)
    return out


def select_wmf(p: Prepared, scs: list[Scenario]) -> tuple[WMF, list[dict]]:
    """Grid over WMF hyper-parameters; pick by mean validation recall@100 (warm + favourites)."""
    trials, best, best_score = [], None, -1.0
    warm_fav = [s for s in scs if s.name != "cold_whole"]   # WMF cannot rank cold items at all
    for params in p.config.wmf_grid:
        m = WMF(iterations=p.config.wmf_iterations, seed=p.config.seed, **params).fit(p.ds.train)
        r = val_recall(m, warm_fav)
        score = float(np.mean(list(r.values())))
        trials.append({"params": params, "val_recall@100": r, "score": score})
        log.info("wmf %s → %s", params, r)
        if score > best_score:
            best, best_score = m, score
    return best, trials


def fit_models(p: Prepared) -> tuple[dict[str, Recommender], dict]:
    """Fit every configured model; returns models by name and a selection log."""
    cfg, ds = p.config, p.ds
    scs = _val_scenarios(p)
    models: dict[str, Recommender] = {}
    selection: dict = {}
    wmf, selection["wmf_trials"] = select_wmf(p, scs)
    selection["wmf"] = wmf.params()
    builders = {
        "popularity": lambda: Popularity(),
        "item-knn": lambda: ItemKNN(K=100),
        "wmf": lambda: wmf,
        "content-knn-tfidf": lambda: ContentKNN(p.tfidf_sparse, name="content-knn-tfidf"),
        "content-knn-minilm": lambda: ContentKNN(p.minilm, name="content-knn-minilm"),
    }
    for name in cfg.models:
        if name in builders:
            with _step(p.timings, f"fit {name}"):
                m = builders[name]()
                models[name] = m if m is wmf else m.fit(ds.train)
    for name, content in (("dropoutnet-tfidf", p.tfidf_dense), ("dropoutnet-minilm", p.minilm)):
        if name not in cfg.models:
            continue
        with _step(p.timings, f"fit {name}"):
            dn = DropoutNet(content, wmf, cfg.dropoutnet, name=name)
            val = lambda m: float(np.mean(list(val_recall(m, scs).values())))  # noqa: E731
            dn.fit(ds.train, validation=val)
            dn.calibrate(val)
            selection[name] = {"best_epoch": dn.best_epoch, "history": dn.history,
                               "cold_bias": dn.cold_bias, "calibration": dn.calibration}
            models[name] = dn
    if "anime2vec-hybrid" in cfg.models and "dropoutnet-minilm" in models:
        with _step(p.timings, "tune anime2vec-hybrid"):
            hy = Hybrid(models["dropoutnet-minilm"], tfidf=p.tfidf_dense).fit(ds.train)   # type: ignore[arg-type]
            hy.tune(_hybrid_objective(p, scs))
            models["anime2vec-hybrid"] = hy
            selection["anime2vec-hybrid"] = {"params": hy.params(), "tuning": hy.tuning}
    selection["val_final"] = {n: val_recall(m, scs) for n, m in models.items()}
    return models, selection


def _hybrid_objective(p: Prepared, scs: list[Scenario]):
    """Validation objective per request type: its own scenario (known users: warm; favourites:
    the favourites scenario) and cold items in the whole catalogue, asked as that request type
    (for favourites: each user's training history given as liked items)."""
    by = {s.name: s for s in scs}
    cw = by["cold_whole"]
    rows = p.ds.train[cw.users]
    cw_liked = Scenario(name="cold_whole_liked", split=cw.split, family=cw.family, users=cw.users,
                        queries=Queries.of_liked([rows[j].indices for j in range(rows.shape[0])],
                                                 [rows[j].data for j in range(rows.shape[0])]),
                        candidates=cw.candidates, truth=cw.truth, exclude=cw.exclude)
    groups = {("users", "own"): by["warm"], ("users", "cold"): cw,
              ("favourites", "own"): by["fav_k5"], ("favourites", "cold"): cw_liked}
    return lambda model, kind, target: val_recall(model, [groups[kind, target]])[groups[kind, target].name]


def evaluate(p: Prepared, models: dict[str, Recommender], split: str = "test"):
    titles = p.catalog["title"].to_numpy()
    exp = Experiment(p.ds, list(models.values()), split=split, diversity_space=p.minilm,
                     seed=p.config.seed, max_queries=p.config.test_queries, titles=titles)
    return exp.run(progress=p.config.progress)


def summarise(results, model: str = SERVING_MODEL) -> dict[str, dict[str, float]]:
    """scenario → metric → value for one model (what a bundle manifest records)."""
    t = results.table[results.table["model"] == model]
    return {sc: dict(zip(g["metric"], g["value"].astype(float))) for sc, g in t.groupby("scenario", sort=False)}


# ---- bundle -------------------------------------------------------------------------------


def export_bundle(p: Prepared, models: dict[str, Recommender], selection: dict, results,
                  version: str | None = None) -> Path:
    """Write the serving bundle: the DropoutNet-MiniLM towers plus everything needed to rebuild
    them, the WMF fallback, content vectors for explanations and new anime, and the catalogue."""
    import io
    import json

    from .bundle import code_fingerprint, write_bundle

    hy: Hybrid = models[SERVING_MODEL]  # type: ignore[assignment]
    dn = hy.dn
    wmf = dn.wmf
    arrays: dict[str, np.ndarray] = {
        "item_ids": p.ds.item_ids, "user_ids": p.ds.user_ids,
        "wmf_U": wmf.U, "wmf_V": wmf.V, "content": p.minilm, "tfidf_content": p.tfidf_dense,
        "item_tower": hy.serving_item_vectors(np.arange(p.ds.n_items)),
        "split.train_items": p.ds.train_items, "split.val_items": p.ds.val_items,
        "split.test_items": p.ds.test_items,
    }
    arrays.update({f"dropoutnet.{k}": v for k, v in dn.state().items()})
    arrays.update({f"whitener.{k}": np.asarray(v) for k, v in p.whitener.to_dict().items()})
    buf = io.BytesIO()
    p.tfidf.save(buf)
    cat = p.catalog.reset_index()
    for col in ("synonyms", "genres"):
        cat[col] = cat[col].map(list)
    cat["year"] = cat["year"].astype("Int64")
    summary = summarise(results) if results is not None else {}
    manifest = {
        "model": SERVING_MODEL,
        "data": {"fingerprint": p.data.fingerprint, "files": p.data.files, "source": p.data.source},
        "code": code_fingerprint(),
        "encoder": {"name": p.encoder.name, "fingerprint": p.encoder.fingerprint, "dim": p.encoder.dim,
                    "recipe": RECIPES.get(p.config.recipe, p.config.recipe), "whiten": p.config.whiten,
                    "max_length": getattr(p.encoder, "max_length", None)},
        "dims": {"n_items": int(p.ds.n_items), "n_users": int(p.ds.n_users), "factors": int(wmf.factors),
                 "content_dim": int(p.minilm.shape[1]), "tower_dim": int(hy.serving_item_vectors(np.arange(1)).shape[1])},
        "hyperparameters": {"wmf": wmf.params(), "dropoutnet": dn.config.to_dict(), "hybrid": hy.params(),
                            "train_config": p.config.describe()},
        "selection": selection,
        "split": p.ds.describe(),
        "metrics": summary,
        "timings": p.timings,
    }
    manifest = json.loads(json.dumps(manifest, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    return write_bundle(p.config.store, manifest, cat, arrays, p.ds.train, version=version,
                        extra_files={"tfidf.npz": buf.getvalue()})

"""The offline pipeline: data → splits → content features → WMF → DropoutNet → evaluation → bundle.

Every step is a function of a `TrainConfig`, seeded, and selection happens on the validation
split only; the test split is touched once, by the final `Experiment`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
from .features.graph import graph_preference_features, propagate, rec_graph
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
ALL_MODELS = ("popularity", "item-knn", "wmf", "content-knn-tfidf", "content-knn-tfidf-graph", "content-knn-minilm",
              "dropoutnet-tfidf", "dropoutnet-tfidf-graph", "dropoutnet-minilm", "dropoutnet-minilm-graph",
              "dropoutnet-pretrained", "dropoutnet-pretrained-graph", "anime2vec-hybrid")
# DropoutNet variants by the content their item tower reads: text encodings ("tfidf": SVD of
# TF-IDF, "minilm": static MiniLM, "pretrained": the in-domain MLM-adapted MiniLM), optionally
# with the recommendation-graph block (features/graph.py). Only MiniLM-family text can serve the
# hybrid: the encoder service must be able to encode a new anime's text the same way.
DROPOUTNET_VARIANTS = {f"dropoutnet-{text}{'-graph' if g else ''}": (text, g)
                       for text in ("tfidf", "minilm", "pretrained") for g in (False, True)}


@dataclass
class TrainConfig:
    data_dir: Path | None = None
    sample: bool = False
    seed: int = 0
    recipe: str = "default"
    encoder: str = "minilm"              # "minilm" (real weights) or "tiny-random" (plumbing tests)
    # directory of an in-domain pre-trained encoder (`anime2vec pretrain`); enables the
    # dropoutnet-pretrained* variants. "tiny-random" here means a second tiny encoder (tests).
    pretrained_encoder: str | None = None
    graph_alphas: tuple[float, ...] = (0.5, 0.8)   # APPNP teleport weights tried for content-kNN + graph
    graph_hops: int = 2
    # DropoutNet under the served hybrid: "auto" picks the best MiniLM-family variant on validation
    serving_dropoutnet: str = "auto"
    # own-scenario recall the hybrid may give up for cold-item recall, climbed only until the blend
    # reaches its DropoutNet's cold recall (models/hybrid.py): a product decision, made explicit
    hybrid_tolerance: tuple[float, ...] = (0.02, 0.05, 0.10)
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
    graph: sp.csr_matrix | None = None   # recommendation-pair adjacency over ds.item_ids
    pretrained_encoder: TextEncoder | None = None
    pretrained_whitener: Whitener | None = None
    pretrained: np.ndarray | None = None # whitened encodings of the pre-trained encoder
    timings: dict = field(default_factory=dict)

    def text_content(self, text: str) -> tuple[np.ndarray, TextEncoder | None, Whitener | None]:
        """(item vectors, encoder, whitener) of a text representation."""
        if text == "tfidf":
            return self.tfidf_dense, None, None
        if text == "minilm":
            return self.minilm, self.encoder, self.whitener
        if text == "pretrained" and self.pretrained is not None:
            return self.pretrained, self.pretrained_encoder, self.pretrained_whitener
        raise KeyError(text)


@contextmanager
def _step(timings: dict, name: str):
    """Log a pipeline step's start and end, and record its seconds (progress for long runs)."""
    start = time.perf_counter()
    log.info("▶ %s", name)
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log.info("✔ %s (%.1f s)", name, timings[name])


def make_encoder(kind: str) -> TextEncoder:
    """"minilm", "tiny-random", or a transformers model directory (e.g. a pre-trained encoder)."""
    if kind == "minilm":
        return TextEncoder()
    if kind == "tiny-random":
        return TextEncoder.tiny_random(seed=0)
    if Path(kind).is_dir():
        return TextEncoder(Path(kind))
    raise ValueError(f"unknown encoder {kind!r} (minilm | tiny-random | a model directory)")


def _encode_whitened(cfg: TrainConfig, encoder: TextEncoder, texts: list[str], ds: Dataset, t: dict, key: str):
    with EncodingCache(Path(cfg.cache_dir) / "encodings.sqlite") as cache:
        raw = encode_cached(encoder, texts, cache, progress=cfg.progress)
        t[f"{key}_cache"] = {"hits": cache.last_stats.hits, "encoded": cache.last_stats.encoded}
    # statistics from training items only: val/test items are unseen at training time
    whitener = Whitener.fit(raw[ds.train_items], mode=cfg.whiten)
    return raw, whitener, whitener.transform(raw)


def prepare(cfg: TrainConfig, extend_dataset: Callable[[Dataset], Dataset] | None = None) -> Prepared:
    """Load data, cut the splits, build both content representations (cached encodings).

    `extend_dataset` (retraining, anime2vec/retrain.py): applied to the split dataset before any
    feature or model sees it, to add feedback interactions; it keeps the item universe and the
    base data's splits."""
    t: dict = {}
    with _step(t, "load data"):
        data = load_mal(cfg.data_dir, sample=cfg.sample)
    with _step(t, "build splits"):
        ds = build_dataset(data.catalog, data.interactions, seed=cfg.seed)
        if extend_dataset is not None:
            ds = extend_dataset(ds)
        catalog = data.catalog.loc[ds.item_ids]
        texts = build_texts(catalog, RECIPES.get(cfg.recipe, cfg.recipe)).tolist()
    with _step(t, "tf-idf"):
        tfidf = TfidfFeatures(svd_dim=min(300, max(2, len(texts) // 4)), seed=cfg.seed)
        tf_sparse = tfidf.fit_transform(texts)
        tf_dense = tfidf.dense(tf_sparse)
    with _step(t, "encode (cached) + whiten"):
        encoder = make_encoder(cfg.encoder)
        raw, whitener, minilm = _encode_whitened(cfg, encoder, texts, ds, t, "encode")
    p = Prepared(cfg, data, ds, catalog, texts, tfidf, tf_sparse, tf_dense, encoder, raw, whitener, minilm, timings=t)
    if cfg.pretrained_encoder:
        with _step(t, "encode with the pre-trained encoder (cached) + whiten"):
            p.pretrained_encoder = (TextEncoder.tiny_random(seed=1) if cfg.pretrained_encoder == "tiny-random"
                                    else TextEncoder(Path(cfg.pretrained_encoder)))
            _, p.pretrained_whitener, p.pretrained = _encode_whitened(cfg, p.pretrained_encoder, texts, ds, t,
                                                                      "encode_pretrained")
    with _step(t, "recommendation graph"):
        p.graph = rec_graph(data.recs, ds.item_ids)
        deg = np.asarray(p.graph.getnnz(axis=1))
        t["graph"] = {"edges": int(p.graph.nnz // 2),
                      **{f"{n}_items_with_edges": round(float(np.mean(deg[idx] > 0)), 4)
                         for n, idx in (("train", ds.train_items), ("val", ds.val_items), ("test", ds.test_items))}}
    return p


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
        "content-knn-tfidf-graph": lambda: _graph_knn(p, scs, selection),
        "content-knn-minilm": lambda: ContentKNN(p.minilm, name="content-knn-minilm"),
    }
    for name in cfg.models:
        if name in builders:
            with _step(p.timings, f"fit {name}"):
                m = builders[name]()
                models[name] = m if m is wmf or m.train is not None else m.fit(ds.train)
    # the graph block: mean WMF factors of each item's training-item neighbours (+ edge weight)
    known = np.zeros(ds.n_items, bool)
    known[ds.train_items] = True
    graph_block = graph_preference_features(wmf.V, p.graph, known) if p.graph is not None else None
    for name, (text, graph) in DROPOUTNET_VARIANTS.items():
        if name not in cfg.models:
            continue
        if text == "pretrained" and p.pretrained is None:
            log.info("skipping %s: no pre-trained encoder configured (TrainConfig.pretrained_encoder)", name)
            continue
        content = p.text_content(text)[0]
        if graph:
            content = np.hstack([content, graph_block]).astype(np.float32)
        with _step(p.timings, f"fit {name}"):
            dn = DropoutNet(content, wmf, cfg.dropoutnet, name=name)
            val = lambda m: float(np.mean(list(val_recall(m, scs).values())))  # noqa: E731
            dn.fit(ds.train, validation=val)
            dn.calibrate(val)
            selection[name] = {"best_epoch": dn.best_epoch, "history": dn.history,
                               "cold_bias": dn.cold_bias, "calibration": dn.calibration,
                               "val_mean": max((h.get("val", -1) for h in dn.history), default=None)}
            models[name] = dn
    base = serving_dropoutnet(cfg, models, scs)
    if "anime2vec-hybrid" in cfg.models and base is not None:
        with _step(p.timings, f"tune anime2vec-hybrid over {base}"):
            dn = models[base]
            text = DROPOUTNET_VARIANTS[base][0]
            hy = Hybrid(dn, tfidf=p.tfidf_dense, content=p.text_content(text)[0]).fit(ds.train)   # type: ignore[arg-type]
            objective = _hybrid_objective(p, scs)
            target = {kind: objective(dn, kind, "cold") for kind in ("users", "favourites")}
            hy.tune(objective, tolerance=cfg.hybrid_tolerance, cold_target=target)
            models["anime2vec-hybrid"] = hy
            selection["anime2vec-hybrid"] = {"params": hy.params(), "tuning": hy.tuning, "dropoutnet": base}
    selection["val_final"] = {n: val_recall(m, scs) for n, m in models.items()}
    return models, selection


def _graph_knn(p: Prepared, scs: list[Scenario], selection: dict) -> ContentKNN:
    """Content-kNN over TF-IDF (SVD) vectors propagated over the recommendation graph; the
    teleport weight is chosen on validation (mean recall@100 of the validation scenarios)."""
    best, trials = None, []
    for alpha in p.config.graph_alphas:
        m = ContentKNN(propagate(p.tfidf_dense, p.graph, alpha=alpha, hops=p.config.graph_hops),
                       name="content-knn-tfidf-graph").fit(p.ds.train)
        r = val_recall(m, scs)
        trials.append({"alpha": alpha, "hops": p.config.graph_hops, "val_recall@100": r})
        if best is None or np.mean(list(r.values())) > best[0]:
            best = (float(np.mean(list(r.values()))), m)
    selection["content-knn-tfidf-graph"] = trials
    return best[1]


def serving_dropoutnet(cfg: TrainConfig, models: dict[str, Recommender], scs: list[Scenario]) -> str | None:
    """The DropoutNet variant the served hybrid is built on: the configured one, or ("auto") the
    MiniLM-family variant with the best mean validation recall. TF-IDF variants are excluded:
    serving a new anime needs its text vector from the encoder service."""
    servable = [n for n in models if n in DROPOUTNET_VARIANTS and DROPOUTNET_VARIANTS[n][0] != "tfidf"]
    if cfg.serving_dropoutnet != "auto":
        if cfg.serving_dropoutnet not in servable:
            raise ValueError(f"serving_dropoutnet={cfg.serving_dropoutnet!r} was not fitted (have {servable})")
        return cfg.serving_dropoutnet
    if not servable:
        return None
    return max(servable, key=lambda n: float(np.mean(list(val_recall(models[n], scs).values()))))


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
    text, graph = DROPOUTNET_VARIANTS.get(dn.name, ("minilm", False))
    content, encoder, whitener = p.text_content(text)
    arrays: dict[str, np.ndarray] = {
        "item_ids": p.ds.item_ids, "user_ids": p.ds.user_ids,
        "wmf_U": wmf.U, "wmf_V": wmf.V, "content": content, "tfidf_content": p.tfidf_dense,
        "item_tower": hy.serving_item_vectors(np.arange(p.ds.n_items)),
        "split.train_items": p.ds.train_items, "split.val_items": p.ds.val_items,
        "split.test_items": p.ds.test_items,
    }
    arrays.update({f"dropoutnet.{k}": v for k, v in dn.state().items()})
    arrays.update({f"whitener.{k}": np.asarray(v) for k, v in whitener.to_dict().items()})
    if graph:   # the DropoutNet reads [content ; graph block]
        arrays["graph_content"] = np.ascontiguousarray(dn.content[:, content.shape[1]:])
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
        "encoder": {"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim,
                    "recipe": RECIPES.get(p.config.recipe, p.config.recipe), "whiten": p.config.whiten,
                    "max_length": getattr(encoder, "max_length", None),
                    "model_dir": p.config.pretrained_encoder if text == "pretrained" else None},
        "dims": {"n_items": int(p.ds.n_items), "n_users": int(p.ds.n_users), "factors": int(wmf.factors),
                 "content_dim": int(content.shape[1]), "tower_dim": int(hy.serving_item_vectors(np.arange(1)).shape[1]),
                 **({"graph_dim": int(arrays["graph_content"].shape[1])} if graph else {})},
        "dropoutnet": dn.name,
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

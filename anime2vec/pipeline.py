"""The offline pipeline: data → splits → content features → baselines → the served hybrid →
evaluation → bundle.

Every step is a function of a `TrainConfig`, seeded, and selection happens on the validation
split only; the test split is touched once, by the final `Experiment`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data.dataset import Dataset, ExternalSplit, build_dataset
from .data.loader import load_mal
from .data.text import RECIPES, build_texts
from .data.types import MalData
from .evaluation.metrics import recall_at_k
from .evaluation.protocol import Experiment, Scenario, scenarios
from .features.cache import EncodingCache, encode_cached
from .features.encoder import TextEncoder
from .features.graph import graph_preference_features, propagate, rec_graph
from .features.metadata import ItemMetadata, content_block
from .features.tfidf import TfidfFeatures
from .features.whiten import Whitener
from .models.base import Queries, Recommender
from .models.bilinear import ContentBilinear
from .models.content_knn import ContentKNN
from .models.dropoutnet import DropoutNet, DropoutNetConfig
from .models.ease import EASE
from .models.hybrid import STAGE2_STARTS, Hybrid
from .models.itemknn import ItemKNN
from .models.popularity import Popularity
from .models.rp3beta import RP3beta
from .models.wmf import WMF
from .paths import default_cache_dir, default_model_store

log = logging.getLogger(__name__)

SERVING_MODEL = "anime2vec-hybrid"
ALL_MODELS = (
    "popularity",
    "item-knn",
    "wmf",
    "ease",
    "rp3beta",
    "content-knn-tfidf",
    "content-knn-tfidf-graph",
    "content-knn-minilm",
    "content-knn-all",
    "content-bilinear",
    "dropoutnet-tfidf",
    "dropoutnet-tfidf-graph",
    "dropoutnet-minilm",
    "dropoutnet-minilm-graph",
    "dropoutnet-pretrained",
    "dropoutnet-pretrained-graph",
    "anime2vec-hybrid",
)
# DropoutNet variants by the content their item tower reads: text encodings ("tfidf": SVD of
# TF-IDF, "minilm": static MiniLM, "pretrained": the in-domain MLM-adapted MiniLM), optionally
# with the recommendation-graph block (features/graph.py). Report-only since the served hybrid
# became EASE + the bilinear content model (models/hybrid.py).
DROPOUTNET_VARIANTS = {
    f"dropoutnet-{text}{'-graph' if g else ''}": (text, g)
    for text in ("tfidf", "minilm", "pretrained")
    for g in (False, True)
}


@dataclass
class TrainConfig:
    data_dir: Path | None = None
    sample: bool = False
    seed: int = 0
    recipe: str = "default"
    encoder: str = "minilm"  # "minilm" (real weights) or "tiny-random" (plumbing tests)
    # False: the quick bundle (`quick()`): nothing is encoded; the hybrid's content is TF-IDF +
    # metadata. The bundle still names the encoder, which encodes added anime for later bundles.
    encoder_block: bool = True
    # directory of an in-domain pre-trained encoder (`anime2vec pretrain`); enables the
    # dropoutnet-pretrained* variants. "tiny-random" here means a second tiny encoder (tests).
    pretrained_encoder: str | None = None
    graph_alphas: tuple[float, ...] = (0.5, 0.8)  # APPNP teleport weights tried for content-kNN + graph
    graph_hops: int = 2
    # None: the served hybrid's group offsets predict a user's next interactions, warm and cold
    # (models/hybrid.py); a number: also keep its own scenario's validation recall (warm for known
    # users, favourites) at ≥ (1 − tolerance) of the warm-only blend's (a product floor)
    hybrid_tolerance: float | None = None
    hybrid_starts: tuple[float, ...] = STAGE2_STARTS  # stage 2's starting offsets (models/hybrid.py)
    ease_lambdas: tuple[float, ...] = (300.0, 1000.0, 3000.0)
    ease_rank: int = 256  # the served, factored EASE (models/ease.py)
    rp3beta_grid: tuple[dict, ...] = ({"alpha": 1.0, "beta": 0.3}, {"alpha": 1.0, "beta": 0.5})
    bilinear_grid: tuple[dict, ...] = ({"lam": 10.0, "mu": 10.0}, {"lam": 1.0, "mu": 1.0})
    content_rank: int = 128  # the bilinear map as two thin matrices in the served vectors
    whiten: str = "center"  # see features/whiten.py
    cache_dir: Path = field(default_factory=default_cache_dir)
    store: Path = field(default_factory=default_model_store)
    models: tuple[str, ...] = ALL_MODELS
    wmf_grid: tuple[dict, ...] = (
        {"factors": 32, "regularization": 0.05, "alpha": 10.0},
        {"factors": 64, "regularization": 0.05, "alpha": 10.0},
        {"factors": 64, "regularization": 0.5, "alpha": 20.0},
        {"factors": 128, "regularization": 0.05, "alpha": 10.0},
        {"factors": 256, "regularization": 5.0, "alpha": 5.0},
    )
    wmf_iterations: int = 15
    dropoutnet: DropoutNetConfig = field(default_factory=DropoutNetConfig)
    # a split supplied from outside (data/dataset.py ExternalSplit); None: the seeded random split
    split: ExternalSplit | None = None
    val_queries: int = 600  # per validation scenario (selection)
    test_queries: int | None = None  # None: every test query
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "TrainConfig":
        """What `make run` serves first on a machine without cached encodings: the served hybrid
        without its MiniLM block, one setting per grid (the full run's usual picks) and capped
        validation and test queries, one start for the hybrid's stage 2 (where the full data's
        validation ended best): minutes instead of the MiniLM encode's ~20. Recall is
        somewhat lower (README); the full bundle replaces it through the quality gate."""
        return cls(
            **{
                "encoder_block": False,
                "models": ("popularity", "wmf", "ease", SERVING_MODEL),
                "ease_lambdas": (300.0,),
                "bilinear_grid": ({"lam": 10.0, "mu": 10.0},),
                "wmf_grid": ({"factors": 32, "regularization": 0.05, "alpha": 10.0},),
                "val_queries": 300,
                "test_queries": 500,
                "hybrid_starts": (-1.0,),
                **kw,
            }
        )

    @property
    def preset(self) -> str:
        return "full" if self.encoder_block else "quick"

    def describe(self) -> dict:
        d = asdict(dataclasses.replace(self, split=None))
        d["split"] = (
            None
            if self.split is None
            else {k: int(len(getattr(self.split, k))) for k in ExternalSplit.__dataclass_fields__}
        )
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
    catalog: pd.DataFrame  # rows aligned to ds.item_ids
    texts: list[str]
    tfidf: TfidfFeatures
    tfidf_sparse: sp.csr_matrix
    tfidf_dense: np.ndarray
    encoder: TextEncoder  # also without an encoder block: it encodes added anime
    minilm_raw: np.ndarray | None  # None: no encoder block (TrainConfig.encoder_block)
    whitener: Whitener | None
    minilm: np.ndarray | None  # whitened, L2-normalised
    graph: sp.csr_matrix | None = None  # recommendation-pair adjacency over ds.item_ids
    pretrained_encoder: TextEncoder | None = None
    pretrained_whitener: Whitener | None = None
    pretrained: np.ndarray | None = None  # whitened encodings of the pre-trained encoder
    metadata: ItemMetadata | None = None  # day-one facts: type, year, episodes, genres
    meta: np.ndarray | None = None
    timings: dict = field(default_factory=dict)

    @property
    def content(self) -> np.ndarray:
        """What the content side of the served model reads: [TF-IDF (SVD) ; MiniLM ; metadata],
        each block unit-length (features/metadata.py), MiniLM left out without an encoder block.
        All of it exists on the day an anime airs."""
        if self._content is None:
            self._content = content_block([b for b in (self.tfidf_dense, self.minilm, self.meta) if b is not None])
        return self._content

    @property
    def content_blocks(self) -> list[str]:
        return ["tfidf", "minilm", "meta"] if self.minilm is not None else ["tfidf", "meta"]

    @property
    def semantic(self) -> np.ndarray:
        """The space explanations and diversity measure similarity in: MiniLM, else TF-IDF."""
        return self.minilm if self.minilm is not None else self.tfidf_dense

    _content: np.ndarray | None = None

    def text_content(self, text: str) -> tuple[np.ndarray, TextEncoder | None, Whitener | None]:
        """(item vectors, encoder, whitener) of a text representation."""
        if text == "tfidf":
            return self.tfidf_dense, None, None
        if text == "minilm" and self.minilm is not None:
            return self.minilm, self.encoder, self.whitener
        if text == "pretrained" and self.pretrained is not None:
            return self.pretrained, self.pretrained_encoder, self.pretrained_whitener
        raise KeyError(text)


@contextmanager
def timed_step(timings: dict, name: str):
    """Log a pipeline step's start and end, and record its seconds (progress for long runs)."""
    start = time.perf_counter()
    log.info("▶ %s", name)
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log.info("✔ %s (%.1f s)", name, timings[name])


def make_encoder(kind: str) -> TextEncoder:
    """ "minilm", "tiny-random", or a transformers model directory (e.g. a pre-trained encoder)."""
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
        stats = cache.last_stats
        assert stats is not None  # set by encode_cached
        t[f"{key}_cache"] = {"hits": stats.hits, "encoded": stats.encoded}
    # statistics from training items only: val/test items are unseen at training time
    whitener = Whitener.fit(raw[ds.train_items], mode=cfg.whiten)
    return raw, whitener, whitener.transform(raw)


def prepare(cfg: TrainConfig, extend_dataset: Callable[[Dataset], Dataset] | None = None) -> Prepared:
    """Load data, cut the splits, build both content representations (cached encodings).

    `extend_dataset` (retraining, anime2vec/retrain/): applied to the split dataset before any
    feature or model sees it, to add feedback interactions; it keeps the item universe and the
    base data's splits."""
    t: dict = {}
    with timed_step(t, "load data"):
        data = load_mal(cfg.data_dir, sample=cfg.sample)
    with timed_step(t, "build splits"):
        ds = build_dataset(data.catalog, data.interactions, seed=cfg.seed, split=cfg.split)
        if extend_dataset is not None:
            ds = extend_dataset(ds)
        catalog = data.catalog.loc[ds.item_ids]
        texts = build_texts(catalog, RECIPES.get(cfg.recipe, cfg.recipe)).tolist()
    with timed_step(t, "tf-idf"):
        tfidf = TfidfFeatures(svd_dim=min(300, max(2, len(texts) // 4)), seed=cfg.seed)
        tf_sparse = tfidf.fit_transform(texts)
        tf_dense = tfidf.dense(tf_sparse)
    encoder = make_encoder(cfg.encoder)
    raw = whitener = minilm = None
    if cfg.encoder_block:
        with timed_step(t, "encode (cached) + whiten"):
            raw, whitener, minilm = _encode_whitened(cfg, encoder, texts, ds, t, "encode")
    p = Prepared(cfg, data, ds, catalog, texts, tfidf, tf_sparse, tf_dense, encoder, raw, whitener, minilm, timings=t)
    p.metadata = ItemMetadata.fit(catalog)
    p.meta = p.metadata.transform(catalog)
    if cfg.pretrained_encoder:
        with timed_step(t, "encode with the pre-trained encoder (cached) + whiten"):
            p.pretrained_encoder = (
                TextEncoder.tiny_random(seed=1)
                if cfg.pretrained_encoder == "tiny-random"
                else TextEncoder(Path(cfg.pretrained_encoder))
            )
            _, p.pretrained_whitener, p.pretrained = _encode_whitened(
                cfg, p.pretrained_encoder, texts, ds, t, "encode_pretrained"
            )
    with timed_step(t, "recommendation graph"):
        p.graph = rec_graph(data.recs, ds.item_ids)
        deg = np.asarray(p.graph.getnnz(axis=1))
        t["graph"] = {
            "edges": int(p.graph.nnz // 2),
            **{
                f"{n}_items_with_edges": round(float(np.mean(deg[idx] > 0)), 4)
                for n, idx in (("train", ds.train_items), ("val", ds.val_items), ("test", ds.test_items))
            },
        }
    return p


# ---- selection on the validation split ---------------------------------------------------
VAL_FAV_KS = (1, 3, 5, 10)


def _val_scenarios(p: Prepared) -> list[Scenario]:
    """The validation scenarios every selection reads (the same seeded queries for every model)."""
    return scenarios(p.ds, split="val", fav_ks=VAL_FAV_KS, seed=p.config.seed, max_queries=p.config.val_queries)


def _pick(scs: list[Scenario], *names: str) -> list[Scenario]:
    by = {s.name: s for s in scs}
    return [by[n] for n in names if n in by]


def val_recall(model: Recommender, scs: list[Scenario], k: int = 100) -> dict[str, float]:
    out = {}
    for s in scs:
        m = model if s.day_one is None else model.day_one(s.day_one)
        recs, _ = m.recommend(s.queries, k, items=s.candidates, exclude=s.exclude)
        out[s.name] = recall_at_k(recs, s.truth, k)
    return out


R = TypeVar("R", bound=Recommender)


def _select(
    kind: str, grid, build: Callable[[dict], R], scs: list[Scenario], timings: dict, keep: list[R] | None = None
) -> tuple[R, list[dict]]:
    """Fit each setting, keep the best by mean validation recall@100 over `scs` (`keep`: a list
    that receives every fitted model)."""
    trials: list[dict] = []
    best: R | None = None
    best_score = -1.0
    for params in grid:
        with timed_step(timings, f"fit {kind} {params}"):
            m = build(dict(params))
        if keep is not None:
            keep.append(m)
        r = val_recall(m, scs)
        score = float(np.mean(list(r.values())))
        trials.append({"params": dict(params), "val_recall@100": r, "score": score})
        log.info("%s %s → %s", kind, params, {k: round(v, 4) for k, v in r.items()})
        if score > best_score:
            best, best_score = m, score
    if best is None:
        raise ValueError(f"{kind}: nothing to select (an empty grid, or no setting with a validation score)")
    return best, trials


def select_wmf(p: Prepared, scs: list[Scenario]) -> tuple[WMF, list[dict]]:
    """Grid over WMF hyper-parameters; by mean validation recall@100 (warm + favourites)."""
    cfg = p.config
    return _select(
        "wmf",
        cfg.wmf_grid,
        lambda kw: WMF(iterations=cfg.wmf_iterations, seed=cfg.seed, **kw).fit(p.ds.train),
        _pick(scs, *CF_SELECTION),
        p.timings,
    )


# collaborative models cannot rank cold anime: selected on known users and favourites
CF_SELECTION = ("warm", "fav_k1", "fav_k5", "fav_k10")
# content models: on cold anime, among cold anime and in the whole catalogue
CONTENT_SELECTION = ("cold_test_items", "cold_whole")


def fit_models(p: Prepared) -> tuple[dict[str, Recommender], dict]:
    """Fit every configured model, each one's hyper-parameters chosen on the validation split;
    returns models by name and a selection log."""
    cfg, ds = p.config, p.ds
    scs = _val_scenarios(p)
    cf_scs, content_scs = _pick(scs, *CF_SELECTION), _pick(scs, *CONTENT_SELECTION)
    models: dict[str, Recommender] = {}
    selection: dict = {}
    need = set(cfg.models)
    if p.minilm is None and (
        bad := sorted(need & ({"content-knn-minilm", "content-knn-all"} | set(DROPOUTNET_VARIANTS)))
    ):
        raise ValueError(
            f"{', '.join(bad)} need MiniLM encodings: not available without the encoder block (the quick preset)"
        )
    wmf = None
    if need & ({"wmf", SERVING_MODEL} | set(DROPOUTNET_VARIANTS)):
        # WMF: a baseline, the DropoutNet's preference model, and the serving fallback
        wmf, selection["wmf_trials"] = select_wmf(p, scs)
        selection["wmf"] = wmf.params()
    ease: EASE | None = None
    eases: list[EASE] = []
    if need & {"ease", SERVING_MODEL}:
        ease, selection["ease_trials"] = _select(
            "ease",
            [{"lam": lam} for lam in cfg.ease_lambdas],
            lambda kw: EASE(seed=cfg.seed, **kw).fit(ds.train),
            cf_scs,
            p.timings,
            keep=eases if SERVING_MODEL in need else None,
        )
        selection["ease"] = ease.params()
    builders: dict[str, Callable[[], Recommender | None]] = {
        "popularity": lambda: Popularity(),
        "item-knn": lambda: ItemKNN(K=100),
        "wmf": lambda: wmf,
        "ease": lambda: ease,
        "rp3beta": lambda: _selected(
            selection, "rp3beta", cfg.rp3beta_grid, lambda kw: RP3beta(**kw).fit(ds.train), cf_scs, p.timings
        ),
        "content-knn-tfidf": lambda: ContentKNN(p.tfidf_sparse, name="content-knn-tfidf"),
        "content-knn-tfidf-graph": lambda: _graph_knn(p, content_scs, selection),
        "content-knn-minilm": lambda: ContentKNN(p.minilm, name="content-knn-minilm"),
        "content-knn-all": lambda: ContentKNN(p.content, name="content-knn-all"),
        "content-bilinear": lambda: _selected(
            selection,
            "content-bilinear",
            cfg.bilinear_grid,
            lambda kw: ContentBilinear(p.content, seed=cfg.seed, **kw).fit(ds.train),
            content_scs,
            p.timings,
        ),
    }
    for name in cfg.models:
        if name in builders:
            with timed_step(p.timings, f"fit {name}"):
                m = builders[name]()
                assert m is not None, name  # wmf / ease: selected above whenever asked for
                models[name] = m if m.train is not None else m.fit(ds.train)
    if need & set(DROPOUTNET_VARIANTS):
        assert wmf is not None  # selected above: the variants need it
        _fit_dropoutnets(p, wmf, scs, models, selection)
    if SERVING_MODEL in need:
        with timed_step(p.timings, f"fit and tune {SERVING_MODEL}"):
            bilinear = models.get("content-bilinear")
            assert bilinear is None or isinstance(bilinear, ContentBilinear)
            hy, selection[SERVING_MODEL] = fit_hybrid(p, eases, bilinear, scs, selection)
            models[SERVING_MODEL] = hy
    selection["val_final"] = {n: val_recall(m, scs) for n, m in models.items()}
    return models, selection


def _selected(selection: dict, kind: str, grid, build, scs, timings) -> Recommender:
    m, selection[f"{kind}_trials"] = _select(kind, grid, build, scs, timings)
    selection[kind] = m.params()
    return m


def _fit_dropoutnets(p: Prepared, wmf: WMF, scs: list[Scenario], models: dict, selection: dict) -> None:
    """DropoutNet variants (compared in the report; the served model no longer needs one)."""
    assert wmf.V is not None, "fit the WMF first"
    cfg, ds = p.config, p.ds
    # the graph block: mean WMF factors of each item's training-item neighbours (+ edge weight)
    known = np.zeros(ds.n_items, bool)
    known[ds.train_items] = True
    graph_block = graph_preference_features(wmf.V, p.graph, known) if p.graph is not None else None
    val_scs = _pick(scs, "cold_whole", "warm", "fav_k5")
    for name, (text, graph) in DROPOUTNET_VARIANTS.items():
        if name not in cfg.models:
            continue
        if text == "pretrained" and p.pretrained is None:
            log.info("skipping %s: no pre-trained encoder configured (TrainConfig.pretrained_encoder)", name)
            continue
        content = p.text_content(text)[0]
        if graph and graph_block is not None:
            content = np.hstack([content, graph_block]).astype(np.float32)
        with timed_step(p.timings, f"fit {name}"):
            dn = DropoutNet(content, wmf, cfg.dropoutnet, name=name)
            dn.post_release_dims = graph_block.shape[1] if graph and graph_block is not None else 0
            val = lambda m: float(np.mean(list(val_recall(m, val_scs).values())))  # noqa: E731
            dn.fit(ds.train, validation=val)
            dn.calibrate(val)
            selection[name] = {
                "best_epoch": dn.best_epoch,
                "history": dn.history,
                "cold_bias": dn.cold_bias,
                "calibration": dn.calibration,
                "val_mean": max((h.get("val", -1) for h in dn.history), default=None),
            }
            models[name] = dn


def fit_hybrid(
    p: Prepared, eases: list[EASE], bilinear: ContentBilinear | None, scs: list[Scenario], selection: dict
) -> tuple[Hybrid, dict]:
    """The served model (models/hybrid.py) over an EASE from the grid and the selected bilinear
    content model, its weights tuned on validation. The EASE λ is the hybrid's own choice: the
    one whose warm-only blend (stage 1: with the popularity prior that rescues one-favourite
    queries) has the best mean recall over its request types; the EASE baseline's pick weighs
    one-favourite queries, where a larger λ acts as a prior, more."""
    cfg, ds = p.config, p.ds
    if not eases:
        eases = [EASE(lam=cfg.ease_lambdas[0], seed=cfg.seed).fit(ds.train)]
    content = bilinear if bilinear is not None else ContentBilinear(p.content, seed=cfg.seed, **cfg.bilinear_grid[0])
    own = _pick(scs, "warm", *(f"fav_k{k}" for k in VAL_FAV_KS))
    trials: list[dict[str, Any]] = []
    best: tuple[Hybrid, dict[str, float]] | None = None
    for ease in eases:
        hy = Hybrid(ease.factored(cfg.ease_rank), content, graph=p.graph, content_rank=cfg.content_rank).fit(ds.train)
        if len(eases) > 1:
            score = hy.tune_warm(HybridObjective(hy, ds, own))
            trials.append({"lambda": ease.lam, "stage1_own": score})
            log.info("hybrid over EASE λ=%g: warm-only blend %s", ease.lam, {k: round(v, 4) for k, v in score.items()})
            if best is not None and np.mean(list(score.values())) <= np.mean(list(best[1].values())):
                continue
        best = (hy, trials[-1]["stage1_own"] if trials else {})
    assert best is not None  # eases is not empty
    hy = best[0]
    hy.tune(
        HybridObjective(hy, ds, scs + mix_scenarios(ds, cfg.seed, cfg.val_queries)),
        tolerance=cfg.hybrid_tolerance,
        starts=cfg.hybrid_starts,
    )
    return hy, {"params": hy.params(), "tuning": hy.tuning, "ease_lambda_trials": trials}


class HybridObjective:
    """Validation recall@100 of a weighting of the hybrid, per request type and target (see
    Hybrid.tune). Component scores are computed once per scenario; each weighting only adds
    them up again. Cold anime asked as favourites: each user's training history given as the
    liked list."""

    def __init__(self, hy: Hybrid, ds: Dataset, scs: list[Scenario], k: int = 100):
        by = {s.name: s for s in scs}
        self.k = k
        self.cases: dict[tuple[str, str], tuple] = {}
        wanted = {
            ("users", "own"): by.get("warm"),
            ("users", "cold"): by.get("cold_whole"),
            ("users", "new"): by.get("new_whole"),
            ("users", "mix"): by.get("mix"),
            ("users", "mix_new"): by.get("mix_new"),
            ("users", "cold_items"): by.get("cold_test_items"),
            ("favourites", "cold_items"): _as_liked(by.get("cold_test_items"), ds),
            ("favourites", "cold"): _as_liked(by.get("cold_whole"), ds),
            ("favourites", "new"): _as_liked(by.get("new_whole"), ds),
            ("favourites", "mix"): _as_liked(by.get("mix"), ds),
            ("favourites", "mix_new"): _as_liked(by.get("mix_new"), ds),
            **{("favourites", f"own:{k}"): by.get(f"fav_k{k}") for k in VAL_FAV_KS},
        }
        for key, sc in wanted.items():
            if sc is None or not len(sc.users):
                continue
            items = np.asarray(sc.candidates, np.int64)
            model = hy if sc.day_one is None else hy.day_one(sc.day_one)
            parts = model.component_scores(sc.queries, items)
            ex = None
            if sc.exclude is not None:
                pos = np.full(ds.n_items, -1)
                pos[items] = np.arange(len(items))
                e = sc.exclude.tocoo()
                c = pos[e.col]
                ex = (e.row[c >= 0], c[c >= 0])
            self.cases[key] = (sc, items, parts, ex)

    def __call__(self, scorer: Callable[[dict], np.ndarray], request: str, target: str) -> float:
        if (request, target) not in self.cases:
            return 0.0
        sc, items, parts, ex = self.cases[request, target]
        s = scorer(parts)
        if ex is not None:
            s[ex] = -np.inf
        k = min(self.k, s.shape[1] - 1)
        top = np.argpartition(-s, k, axis=1)[:, :k]
        return recall_at_k(items[top], sc.truth, self.k)


def mix_scenarios(ds: Dataset, seed: int, max_queries: int | None) -> list[Scenario]:
    """Validation only (the hybrid's stage 2): a training user's next interactions whatever their
    group: the warm-validation positives plus their positives on validation items, sampled at the
    warm holdout's rate (a warm-validation positive is one of ~10% of a user's warm positives, a
    cold one 100% of theirs: unsampled, cold anime would weigh ~10× what they do in the user's
    future). Whole catalogue minus the training history. "mix_new": the same with every anime
    without training interactions scored as brand-new."""
    rng = np.random.default_rng([seed, 7])
    rate = float(ds.params.get("warm_fractions", [0.1])[0])
    cold = ds.cold_val.tocoo()
    keep = rng.random(cold.nnz) < rate
    cold = sp.csr_matrix((cold.data[keep], (cold.row[keep], cold.col[keep])), shape=cold.shape)
    truth = (ds.warm_val + cold).tocsr()
    users = np.intersect1d(np.flatnonzero(truth.getnnz(axis=1)), ds.train_users)
    if max_queries is not None and len(users) > max_queries:
        users = np.sort(rng.choice(users, max_queries, replace=False))
    if not len(users):
        return []
    items = np.arange(ds.n_items)
    known = ds.train[users].tocsr()
    mix = Scenario("mix", Queries.of_users(users), items, truth[users], known, "val", "warm", users)
    never_seen = np.setdiff1d(items, np.asarray(ds.train_items, np.int64))
    return [mix, dataclasses.replace(mix, name="mix_new", day_one=never_seen)]


def _as_liked(sc: Scenario | None, ds: Dataset) -> Scenario | None:
    if sc is None:
        return None
    rows = ds.train[sc.users]
    return dataclasses.replace(
        sc,
        name=sc.name + "_liked",
        queries=Queries.of_liked(
            [rows[j].indices for j in range(rows.shape[0])], [rows[j].data for j in range(rows.shape[0])]
        ),
    )


def _graph_knn(p: Prepared, scs: list[Scenario], selection: dict) -> ContentKNN:
    """Content-kNN over TF-IDF (SVD) vectors propagated over the recommendation graph; the
    teleport weight is chosen on validation (cold anime). On the day it airs an anime has no
    pairs: `day_one` scores it from its own TF-IDF vector."""
    best, trials = None, []
    for alpha in p.config.graph_alphas:
        m = ContentKNN(
            propagate(p.tfidf_dense, p.graph, alpha=alpha, hops=p.config.graph_hops),
            name="content-knn-tfidf-graph",
            day_one_features=p.tfidf_dense,
        ).fit(p.ds.train)
        r = val_recall(m, scs)
        trials.append({"alpha": alpha, "hops": p.config.graph_hops, "val_recall@100": r})
        if best is None or np.mean(list(r.values())) > best[0]:
            best = (float(np.mean(list(r.values()))), m)
    selection["content-knn-tfidf-graph"] = trials
    if best is None:
        raise ValueError("content-knn-tfidf-graph: no graph_alphas to select from")
    return best[1]


def evaluate(p: Prepared, models: dict[str, Recommender], split: str = "test"):
    titles = p.catalog["title"].to_numpy()
    exp = Experiment(
        p.ds,
        list(models.values()),
        split=split,
        diversity_space=p.semantic,
        seed=p.config.seed,
        max_queries=p.config.test_queries,
        titles=titles,
    )
    return exp.run(progress=p.config.progress)


def summarise(results, model: str = SERVING_MODEL) -> dict[str, dict[str, float]]:
    """scenario → metric → value for one model (what a bundle manifest records)."""
    t = results.table[results.table["model"] == model]
    return {sc: dict(zip(g["metric"], g["value"].astype(float))) for sc, g in t.groupby("scenario", sort=False)}


# ---- bundle -------------------------------------------------------------------------------


def export_bundle(
    p: Prepared, models: dict[str, Recommender], selection: dict, results, version: str | None = None
) -> Path:
    """Write the serving bundle: the served hybrid's arrays (models/hybrid.py `state`), what a new
    anime's content row is built from (TF-IDF vocabulary, the MiniLM whitener, the metadata
    vocabularies), the WMF fallback, MiniLM vectors (TF-IDF without the encoder block) for
    explanations and diversity, and the catalogue."""
    import io
    import json

    from .bundle import code_fingerprint, write_bundle

    hy: Hybrid = models[SERVING_MODEL]  # type: ignore[assignment]
    wmf = models.get("wmf")
    if wmf is None:
        wmf = WMF(iterations=p.config.wmf_iterations, seed=p.config.seed, **p.config.wmf_grid[0]).fit(p.ds.train)
    assert isinstance(wmf, WMF) and wmf.U is not None and wmf.V is not None, "models['wmf'] is a fitted WMF"
    assert p.metadata is not None  # set by prepare()
    arrays: dict[str, np.ndarray] = {
        "item_ids": p.ds.item_ids,
        "user_ids": p.ds.user_ids,
        "wmf_U": wmf.U,
        "wmf_V": wmf.V,
        "content": p.semantic,
        "tfidf_content": p.tfidf_dense,
        "item_tower": hy.serving_item_vectors(np.arange(p.ds.n_items)),
        "split.train_items": p.ds.train_items,
        "split.val_items": p.ds.val_items,
        "split.test_items": p.ds.test_items,
    }
    arrays.update({f"hybrid.{k}": v for k, v in hy.state().items()})
    if p.whitener is not None:
        arrays.update({f"whitener.{k}": np.asarray(v) for k, v in p.whitener.to_dict().items()})
    buf = io.BytesIO()
    p.tfidf.save(buf)
    cat = p.catalog.reset_index()
    for col in ("synonyms", "genres"):
        cat[col] = cat[col].map(list)
    cat["year"] = cat["year"].astype("Int64")
    summary = summarise(results) if results is not None else {}
    encoder = p.encoder
    manifest = {
        "model": SERVING_MODEL,
        "preset": p.config.preset,
        # the hybrid's content row and the space of `content` (serving_model/model.py builds an added anime's)
        "content": {"blocks": p.content_blocks, "space": "minilm" if p.minilm is not None else "tfidf"},
        "data": {"fingerprint": p.data.fingerprint, "files": p.data.files, "source": p.data.source},
        "code": code_fingerprint(),
        "encoder": {
            "name": encoder.name,
            "fingerprint": encoder.fingerprint,
            "dim": encoder.dim,
            "recipe": RECIPES.get(p.config.recipe, p.config.recipe),
            "whiten": p.config.whiten,
            "max_length": getattr(encoder, "max_length", None),
            "model_dir": None,
        },
        "metadata": p.metadata.to_dict(),
        "dims": {
            "n_items": int(p.ds.n_items),
            "n_users": int(p.ds.n_users),
            "factors": int(wmf.factors),
            "content_dim": int(p.semantic.shape[1]),
            "tower_dim": int(arrays["item_tower"].shape[1]),
            "hybrid_content_dim": int(hy.C.shape[1]),
        },
        "hyperparameters": {"wmf": wmf.params(), "hybrid": hy.params(), "train_config": p.config.describe()},
        "selection": selection,
        "split": p.ds.describe(),
        "metrics": summary,
        "timings": p.timings,
    }
    manifest = json.loads(json.dumps(manifest, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    return write_bundle(
        p.config.store, manifest, cat, arrays, p.ds.train, version=version, extra_files={"tfidf.npz": buf.getvalue()}
    )

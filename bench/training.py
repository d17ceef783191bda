"""Training cost on the real data (the full MAL files): what `anime2vec train` spends its time on.

- WMF: seconds per ALS iteration (implicit, as WMF.fit runs it) at the selected rank (32) and the
  largest of the grid (128); baseline: the same run's dense GEMM rate, so a reader can tell a slow
  machine from a slow model.
- DropoutNet: seconds per epoch through the real `DropoutNet.fit` (an epoch ends where fit calls its
  validation hook; the first epoch also pays the set-up, so epochs 2.. are the figure).
- Encodings: every default-recipe text of the item universe looked up in the encoding cache
  (.cache/encodings.sqlite, read only) against fresh MiniLM encoding of a small random sample,
  extrapolated per text to all of them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from anime2vec.paths import default_cache_dir

WMF_PARAMS = {"regularization": 0.05, "alpha": 10.0}
WMF_RANKS = (32, 128)


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of float32 GEMM rate right now (the machine's speed under its current load)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _wmf_iterations(train, factors: int, iterations: int) -> dict:
    from threadpoolctl import threadpool_limits

    from anime2vec.models.wmf import WMF

    wmf = WMF(factors=factors, iterations=iterations, **WMF_PARAMS)
    als = wmf._als()  # exactly the solver WMF.fit builds
    per_iter: list[float] = []
    start = time.perf_counter()
    with threadpool_limits(1, "blas"):
        als.fit(train, show_progress=False, callback=lambda it, elapsed, loss: per_iter.append(elapsed))
    total = time.perf_counter() - start
    # the rest of WMF.fit: factors of rows without training data are exactly zero (cold)
    wmf.model, wmf.train = als, train
    wmf.U = np.ascontiguousarray(als.user_factors, dtype=np.float32)
    wmf.V = np.ascontiguousarray(als.item_factors, dtype=np.float32)
    wmf.V[np.asarray(train.getnnz(axis=0)).ravel() == 0] = 0.0
    wmf.U[np.asarray(train.getnnz(axis=1)).ravel() == 0] = 0.0
    return {
        "factors": factors,
        "iterations": iterations,
        "iteration_s": float(np.median(per_iter)),
        "iteration_times_s": per_iter,
        "fit_s": total,
        "model": wmf,
    }


def run_training_bench(
    wmf_iterations: int = 5,
    dn_epochs: int = 3,
    fresh_texts: int = 24,
    data_dir=None,
    cache_path: Path | None = None,
    progress=print,
) -> dict:
    from anime2vec.data.dataset import build_dataset
    from anime2vec.data.loader import load_mal
    from anime2vec.data.text import RECIPES, build_texts
    from anime2vec.features.cache import EncodingCache, text_key
    from anime2vec.features.encoder import TextEncoder
    from anime2vec.features.whiten import Whitener
    from anime2vec.models.dropoutnet import DropoutNet, DropoutNetConfig
    from anime2vec.models.wmf import WMF

    out: dict = {"gemm_gflops_start": gemm_gflops()}
    progress("training: loading the full data and building the splits")
    t0 = time.perf_counter()
    data = load_mal(data_dir)
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = build_dataset(data.catalog, data.interactions, seed=0)
    texts = build_texts(data.catalog.loc[ds.item_ids], RECIPES["default"]).tolist()
    out["split_and_texts_s"] = time.perf_counter() - t0
    train = ds.train.tocsr().astype(np.float32)
    out["data"] = {
        "users": int(ds.n_users),
        "items": int(ds.n_items),
        "train_users": int(len(ds.train_users)),
        "train_nnz": int(train.nnz),
        "texts": len(texts),
    }

    # ---- encodings: cache vs fresh ----
    progress(f"training: {len(texts):,} texts looked up in the encoding cache, {fresh_texts} encoded fresh")
    encoder = TextEncoder()
    cache_path = cache_path or default_cache_dir() / "encodings.sqlite"
    enc: dict = {"cache": str(cache_path), "encoder": encoder.name, "fingerprint": encoder.fingerprint}
    raw = None
    if cache_path.is_file():
        with EncodingCache(cache_path) as cache:
            keys = [text_key(t) for t in texts]
            t0 = time.perf_counter()
            found = cache.get_many(encoder.fingerprint, keys, encoder.dim)
            lookup_s = time.perf_counter() - t0
        enc.update(
            cached_texts=len(keys),
            hits=sum(k in found for k in keys),
            lookup_s=lookup_s,
            lookup_ms_per_text=lookup_s / len(keys) * 1e3,
        )
        if all(k in found for k in keys):
            raw = np.stack([found[k] for k in keys])
    else:
        enc.update(cached_texts=0, hits=0, lookup_s=None, note="no cache file: run `anime2vec train` once")
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), fresh_texts, replace=False)]
    encoder.encode(sample[:4])  # warm-up
    t0 = time.perf_counter()
    encoder.encode(sample)
    fresh_s = time.perf_counter() - t0
    enc.update(
        fresh_sample=fresh_texts,
        fresh_s=fresh_s,
        fresh_ms_per_text=fresh_s / fresh_texts * 1e3,
        fresh_all_s_extrapolated=fresh_s / fresh_texts * len(texts),
    )
    if enc.get("lookup_s"):
        enc["speedup_cache_vs_fresh"] = enc["fresh_all_s_extrapolated"] / enc["lookup_s"]
    out["encoding"] = enc
    del encoder

    # ---- WMF ----
    wmf_runs = []
    for factors in WMF_RANKS:
        progress(f"training: WMF rank {factors}, {wmf_iterations} ALS iterations on {train.nnz:,} positives")
        wmf_runs.append(_wmf_iterations(train, factors, wmf_iterations))
    out["wmf"] = [{k: v for k, v in r.items() if k != "model"} for r in wmf_runs]
    for r in out["wmf"]:
        r["ns_per_positive_per_factor"] = r["iteration_s"] / train.nnz / r["factors"] * 1e9

    # ---- DropoutNet over WMF rank 32 ----
    if raw is None:  # the cache did not hold every text: encode nothing more, use random content
        content, content_kind = np.random.default_rng(0).standard_normal((len(texts), 384)).astype(np.float32), "random"
    else:
        content, content_kind = Whitener.fit(raw[ds.train_items], mode="center").transform(raw), "MiniLM (cache)"
    wmf: WMF = wmf_runs[0]["model"]
    marks: list[float] = []
    config = DropoutNetConfig(epochs=dn_epochs, patience=dn_epochs + 1)
    progress(f"training: DropoutNet, {dn_epochs} epochs on {len(ds.train_users):,} training users")
    dn = DropoutNet(content, wmf, config, name="bench")
    start = time.perf_counter()
    dn.fit(train, validation=lambda model: (marks.append(time.perf_counter()), 0.0)[1])
    epochs = np.diff([start, *marks])
    users_with_data = int((train.getnnz(axis=1) > 0).sum())
    steps = -(-users_with_data // config.batch_users)
    out["dropoutnet"] = {
        "epochs": dn_epochs,
        "content": content_kind,
        "epoch_times_s": epochs.tolist(),
        "first_epoch_s": float(epochs[0]),
        "epoch_s": float(np.median(epochs[1:])) if len(epochs) > 1 else float(epochs[0]),
        "steps_per_epoch": steps,
        "config": config.to_dict(),
    }
    out["dropoutnet"]["step_s"] = out["dropoutnet"]["epoch_s"] / steps
    out["dropoutnet"]["epoch_vs_als_iteration"] = out["dropoutnet"]["epoch_s"] / out["wmf"][0]["iteration_s"]
    out["gemm_gflops_end"] = gemm_gflops()
    return out

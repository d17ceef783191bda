"""Scale curves on synthetic data shaped like the real one (bench/synthetic.py).

Two axes:
- items (10k → 100k → 1M): the embedded Qdrant index at the served vector size: build time, memory
  (peak and resident, against the raw float32 vectors as baseline) and exact top-k latency of the
  favourites query (limit 11, three ids excluded) against exact numpy search on the same vectors;
- users (10k → 100k → 1M → 5M, catalogue fixed at the real item count, positives per user and
  item popularity as in the real data): ALS seconds per iteration and peak memory (against the
  CSR matrix's own bytes), and DropoutNet seconds per training step and per epoch.

Every point runs in a fresh process (`python -m bench.scale`, a pickled spec on stdin), so its peak
memory is its own. Points too big for the time budget are not run: a linear model fitted to the
measured points predicts them, and they are marked `extrapolated`.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ITEM_SIZES = (10_000, 100_000, 1_000_000)
USER_SIZES = (10_000, 100_000, 1_000_000, 5_000_000)
MEASURE_ITEMS = (10_000, 30_000, 100_000)  # the others are extrapolated
MEASURE_USERS = (10_000, 30_000, 100_000)
REAL_ITEMS = 16_686  # the served catalogue (items with a synopsis)
SERVED_DIM = 917  # item-tower vector size of the full bundle
QUERY_LIMIT, QUERY_EXCLUDED = 11, 3  # a favourites page: limit 10 + 1, the 3 favourites excluded
ALS_FACTORS = 32  # the selected WMF configuration
LATENCY_BUDGET_MS = 20.0  # the gateway's p99 target, for "where one machine stops"
ROOT = Path(__file__).resolve().parents[1]


# ---- memory of this process ---------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Give freed heap back to the OS, then reset VmHWM to the current RSS (Linux ≥ 4.0), so the
    next peak is the operation's own (memory freed earlier but kept by malloc would hide it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mib(kb: int) -> float:
    return kb / 1024


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- points (run in the child process) ----------------------------------------------------
def index_point(n_items: int, dim: int, n_queries: int, seed: int = 0) -> dict:
    from anime2vec.index.base import ItemPoint, SearchFilter
    from anime2vec.index.edge import EdgeItemIndex
    from bench.synthetic import item_vectors

    rng = np.random.default_rng(seed)
    vectors = item_vectors(n_items, dim, seed)
    years = rng.integers(1970, 2024, n_items)
    types = np.array(["TV", "Movie", "OVA", "ONA", "Special"])[rng.integers(0, 5, n_items)]
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    excluded = [rng.choice(n_items, QUERY_EXCLUDED, replace=False) for _ in range(n_queries)]
    points = (
        ItemPoint(
            i,
            vectors[i],
            {
                "title": f"anime {i}",
                "genres": ["Action"],
                "type": str(types[i]),
                "year": int(years[i]),
                "members": 0,
                "cold": False,
            },
        )
        for i in range(n_items)
    )
    with tempfile.TemporaryDirectory(prefix="a2v-bench-scale-") as root:
        peak_ok = _reset_peak()
        rss0 = _status_kb("VmRSS")
        index = EdgeItemIndex(Path(root))
        start = time.perf_counter()
        index.create_version("scale", dim, points)
        build_s = time.perf_counter() - start
        peak_build = _status_kb("VmHWM")
        index.search(queries[0], QUERY_LIMIT, version="scale")  # open the shard outside the timed loop
        rss_open = _status_kb("VmRSS")
        disk = _dir_bytes(Path(root))
        q_t, q_ids = [], []
        for q, ex in zip(queries, excluded):
            flt = SearchFilter(exclude_ids=tuple(int(i) for i in ex))
            t0 = time.perf_counter()
            hits = index.search(q, QUERY_LIMIT, flt=flt, version="scale")
            q_t.append(time.perf_counter() - t0)
            q_ids.append([h.anime_id for h in hits])
        index.close()
    n_t, n_ids = [], []
    for q, ex in zip(queries, excluded):
        t0 = time.perf_counter()
        scores = vectors @ q
        scores[ex] = -np.inf
        top = np.argpartition(-scores, QUERY_LIMIT - 1)[:QUERY_LIMIT]
        top = top[np.argsort(-scores[top])]
        n_t.append(time.perf_counter() - t0)
        n_ids.append(top.tolist())
    recall = float(np.mean([len(set(a) & set(b)) / QUERY_LIMIT for a, b in zip(q_ids, n_ids)]))
    q_ms, n_ms = np.asarray(q_t) * 1e3, np.asarray(n_t) * 1e3
    return {
        "n_items": n_items,
        "dim": dim,
        "queries": n_queries,
        "build_s": build_s,
        "build_points_per_s": n_items / build_s,
        "raw_vectors_mib": n_items * dim * 4 / 2**20,
        "build_peak_mib": _mib(peak_build - rss0) if peak_ok else None,
        "resident_after_open_mib": _mib(rss_open - rss0),
        "disk_mib": disk / 2**20,
        "qdrant_p50_ms": float(np.percentile(q_ms, 50)),
        "qdrant_p99_ms": float(np.percentile(q_ms, 99)),
        "numpy_p50_ms": float(np.percentile(n_ms, 50)),
        "numpy_p99_ms": float(np.percentile(n_ms, 99)),
        "recall_vs_numpy": recall,
    }


def als_point(n_users: int, n_items: int, iterations: int, shape: dict, seed: int = 0) -> dict:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from bench.synthetic import Shape, interactions

    t0 = time.perf_counter()
    train = interactions(Shape(**shape), n_users, n_items, seed)
    gen_s = time.perf_counter() - t0
    csr_bytes = train.data.nbytes + train.indices.nbytes + train.indptr.nbytes
    peak_ok = _reset_peak()
    rss0 = _status_kb("VmRSS")
    # As WMF.fit runs it: implicit's own threads, BLAS single-threaded.
    als = AlternatingLeastSquares(
        factors=ALS_FACTORS,
        regularization=0.05,
        alpha=10.0,
        iterations=iterations,
        random_state=seed,
        calculate_training_loss=False,
    )
    per_iter: list[float] = []
    start = time.perf_counter()
    with threadpool_limits(1, "blas"):
        als.fit(train, show_progress=False, callback=lambda it, elapsed, loss: per_iter.append(elapsed))
    fit_s = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {
        "n_users": n_users,
        "n_items": n_items,
        "nnz": int(train.nnz),
        "generate_s": gen_s,
        "iterations": iterations,
        "iteration_s": float(np.median(per_iter)),
        "iteration_times_s": per_iter,
        "fit_s": fit_s,
        "setup_s": fit_s - float(np.sum(per_iter)),
        "csr_mib": csr_bytes / 2**20,
        "peak_mib": _mib(peak - rss0) if peak_ok else None,
        "threads": os.cpu_count(),
    }


def dropoutnet_point(n_items: int, steps: int, pool_users: int, shape: dict, seed: int = 0) -> dict:
    """One DropoutNet training step, the function dropoutnet.DropoutNet.fit runs (`training_step`:
    same towers, sampling, loss and optimiser, default config) on random standardised inputs, each user's pool of top items drawn
    from the real popularity curve (real pools overlap on popular items, which sets how many distinct
    items a batch sends through the item tower); and the per-user cost of the top-pool
    precomputation (each user's scores against every item) that precedes the epochs."""
    import torch

    from anime2vec.models.dropoutnet import DropoutNetConfig, Tower, training_step
    from bench.synthetic import Shape

    c = DropoutNetConfig()
    rng = np.random.default_rng(seed)
    d_content, factors = 384, ALS_FACTORS
    n_users = max(pool_users, 4 * c.batch_users)
    U = rng.standard_normal((n_users, factors), dtype=np.float32) * 0.1
    V = rng.standard_normal((n_items, factors), dtype=np.float32) * 0.1
    pu, pt = (rng.standard_normal((n_users, factors), dtype=np.float32) for _ in range(2))
    cu = rng.standard_normal((n_users, d_content), dtype=np.float32)
    pv = rng.standard_normal((n_items, factors), dtype=np.float32)
    cv = rng.standard_normal((n_items, d_content), dtype=np.float32)
    items = np.arange(n_items)
    pool = min(c.top_pool, n_items)

    t0 = time.perf_counter()
    top = np.empty((pool_users, pool), np.int64)
    for s in range(0, pool_users, 1024):
        sc = U[s : s + 1024] @ V.T
        top[s : s + 1024] = np.argpartition(-sc, pool - 1, axis=1)[:, :pool]
    pool_per_user_s = (time.perf_counter() - t0) / pool_users
    cdf = np.cumsum(Shape(**shape).item_weights(n_items))
    by_rank = rng.permutation(n_items)
    top = by_rank[np.minimum(np.searchsorted(cdf / cdf[-1], rng.random((n_users, pool))), n_items - 1)]

    torch.manual_seed(c.seed)
    f_u, f_v = Tower(factors + d_content, c.hidden, c.out_dim), Tower(factors + d_content, c.hidden, c.out_dim)
    opt = torch.optim.Adam(list(f_u.parameters()) + list(f_v.parameters()), lr=c.lr, weight_decay=c.weight_decay)
    f_u.train()
    f_v.train()
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))  # noqa: E731
    times = []
    uniques = []
    for step in range(steps + 2):  # 2 warm-up steps
        start = time.perf_counter()
        b = rng.choice(n_users, c.batch_users, replace=False)
        _, distinct = training_step(f_u, f_v, opt, c, rng, b, top[b], items, U, V, pu, pt, cu, pv, cv, t)
        uniques.append(distinct)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return {
        "n_items": n_items,
        "batch_users": c.batch_users,
        "steps": steps,
        "distinct_items_per_step": float(np.mean(uniques)),
        "step_s": float(np.median(times)),
        "step_p90_s": float(np.percentile(times, 90)),
        "top_pool_per_user_s": pool_per_user_s,
        "torch_threads": torch.get_num_threads(),
    }


POINTS = {"index": index_point, "als": als_point, "dropoutnet": dropoutnet_point}


def run_point(kind: str, timeout_s: float = 900, **params) -> dict:
    """One point in a fresh Python process; its result dict."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale"],
        input=pickle.dumps((kind, params)),
        capture_output=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"scale point {kind} {params} failed ({proc.returncode}): {proc.stderr.decode()[-3000:]}")
    status, value = pickle.loads(proc.stdout)
    if status != "ok":
        raise RuntimeError(f"scale point {kind} {params} failed: {value}")
    return value


def _child() -> int:
    kind, params = pickle.load(sys.stdin.buffer)
    try:
        out = ("ok", POINTS[kind](**params))
    except Exception as e:
        import traceback

        out = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
    pickle.dump(out, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


# ---- curves --------------------------------------------------------------------------------
def curve(
    measured: list[dict], x_key: str, y_key: str, sizes: tuple[int, ...], x_of=None, model: str = "proportional"
) -> dict:
    """Measured points as they are, the other sizes from a model of the measured ones:
    - "proportional": y ∝ x from the largest measured point. For work that is linear in x (a scan of
      every vector, a pass over every positive): on a shared machine the largest point is the least
      disturbed by fixed costs and noise (a line through small noisy points can even go negative).
    - "marginal": the largest point plus the slope between the two largest points. For memory and
      build time, which carry a fixed part (engine start-up, preallocated segments) that a
      proportional model would multiply; falls back to proportional when the slope is not positive.
    x_of(size) maps a size to the model's x (e.g. users → positives)."""
    x_of = x_of or (lambda n: n)
    pts = sorted((m[x_key], m[y_key]) for m in measured if m.get(y_key) is not None)
    if not pts:
        return {"model": None, "points": []}
    n_max, y_max = pts[-1]
    x_max = x_of(n_max)
    slope = y_max / x_max
    how = f"{y_key} ∝ x, scaled from the largest measured point ({n_max:,}: {y_max:.4g})"
    if model == "marginal" and len(pts) > 1:
        n_prev, y_prev = pts[-2]
        marginal = (y_max - y_prev) / (x_max - x_of(n_prev))
        if marginal > 0:
            slope = marginal
            how = (
                f"{y_key} = {y_max:.4g} + {marginal:.4g}·(x − {x_max:,.0f}): the largest measured point plus "
                f"the slope between the two largest"
            )
    done = {n for n, _ in pts}
    points = [{"size": n, "value": y, "extrapolated": False} for n, y in pts]
    points += [
        {"size": n, "value": y_max + slope * (x_of(n) - x_max), "extrapolated": True} for n in sizes if n not in done
    ]
    points.sort(key=lambda p: p["size"])
    return {"model": how, "x_max": x_max, "y_max": y_max, "slope": slope, "points": points}


def machine_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run_scale_bench(
    item_sizes: tuple[int, ...] = ITEM_SIZES,
    user_sizes: tuple[int, ...] = USER_SIZES,
    measure_items: tuple[int, ...] = MEASURE_ITEMS,
    measure_users: tuple[int, ...] = MEASURE_USERS,
    n_items_users_axis: int = REAL_ITEMS,
    dim: int | None = None,
    n_queries: int = 40,
    als_iterations: int = 3,
    dn_steps: int = 5,
    shape=None,
    progress=print,
) -> dict:
    from bench.synthetic import real_shape

    dim = dim or served_dim()
    shape = shape or real_shape()
    index_pts, als_pts, dn_pts = [], [], []
    for n in measure_items:
        progress(f"scale: Qdrant index, {n:,} items × {dim} dims")
        index_pts.append(run_point("index", n_items=n, dim=dim, n_queries=n_queries))
    for n in measure_users:
        progress(f"scale: ALS, {n:,} users × {n_items_users_axis:,} items, {als_iterations} iterations")
        als_pts.append(
            run_point("als", n_users=n, n_items=n_items_users_axis, iterations=als_iterations, shape=shape.to_dict())
        )
    for n in sorted({n_items_users_axis, max(measure_items)}):
        progress(f"scale: DropoutNet training step, {n:,} items")
        dn_pts.append(run_point("dropoutnet", n_items=n, steps=dn_steps, pool_users=2048, shape=shape.to_dict()))

    # users → expected positives: the measured points' own positives per user
    per_user = float(np.mean([p["nnz"] / p["n_users"] for p in als_pts]))
    nnz_of = lambda n: n * per_user  # noqa: E731
    step_s = float(np.median([p["step_s"] for p in dn_pts]))
    pool_s = next(p for p in dn_pts if p["n_items"] == n_items_users_axis)["top_pool_per_user_s"]
    dn_epoch = [
        {
            "size": n,
            "steps": math.ceil(n / dn_pts[0]["batch_users"]),
            "value": math.ceil(n / dn_pts[0]["batch_users"]) * step_s + n * pool_s,
            "extrapolated": n not in measure_users,
        }
        for n in sorted({*user_sizes, *measure_users})
    ]
    items_curves = {
        "build_s": curve(index_pts, "n_items", "build_s", item_sizes, model="marginal"),
        "build_peak_mib": curve(index_pts, "n_items", "build_peak_mib", item_sizes, model="marginal"),
        "resident_mib": curve(index_pts, "n_items", "resident_after_open_mib", item_sizes, model="marginal"),
        "disk_mib": curve(index_pts, "n_items", "disk_mib", item_sizes, model="marginal"),
        "qdrant_p50_ms": curve(index_pts, "n_items", "qdrant_p50_ms", item_sizes),
        "qdrant_p99_ms": curve(index_pts, "n_items", "qdrant_p99_ms", item_sizes),
        "numpy_p50_ms": curve(index_pts, "n_items", "numpy_p50_ms", item_sizes),
        "numpy_p99_ms": curve(index_pts, "n_items", "numpy_p99_ms", item_sizes),
    }
    users_curves = {
        "als_iteration_s": curve(als_pts, "n_users", "iteration_s", user_sizes, x_of=nnz_of),
        "als_peak_mib": curve(als_pts, "n_users", "peak_mib", user_sizes, x_of=nnz_of, model="marginal"),
        "csr_mib": curve(als_pts, "n_users", "csr_mib", user_sizes, x_of=nnz_of),
        "dropoutnet_epoch_s": {
            "model": "computed, not run: ceil(users / 256) steps × the median measured step + "
            f"users × the measured top-pool cost per user ({n_items_users_axis:,} items)",
            "points": dn_epoch,
        },
    }
    mem_gib = machine_memory_gib()
    return {
        "shape": shape.to_dict(),
        "dim": dim,
        "items_axis_sizes": list(item_sizes),
        "users_axis_sizes": list(user_sizes),
        "users_axis_items": n_items_users_axis,
        "positives_per_user": per_user,
        "query": {"limit": QUERY_LIMIT, "excluded_ids": QUERY_EXCLUDED, "queries": n_queries},
        "measured": {"index": index_pts, "als": als_pts, "dropoutnet": dn_pts},
        "items": items_curves,
        "users": users_curves,
        "dropoutnet_step_s": step_s,
        "machine_memory_gib": mem_gib,
        "limits": one_machine_limits(items_curves, users_curves, mem_gib, per_user),
    }


def _crossing(c: dict, limit: float) -> float | None:
    """x where the curve's model reaches `limit` (None without a model)."""
    if not c.get("slope"):
        return None
    return max(0.0, c["x_max"] + (limit - c["y_max"]) / c["slope"])


def one_machine_limits(items: dict, users: dict, mem_gib: float, per_user: float) -> dict:
    """Where this machine stops: the sizes at which a fitted curve crosses a latency or memory bound
    (the users-axis curves are lines in positives, hence the division by positives per user)."""
    mem_mib = mem_gib * 1024
    als_nnz = _crossing(users["als_peak_mib"], mem_mib)
    return {
        "latency_budget_ms": LATENCY_BUDGET_MS,
        "items_at_qdrant_p99_budget": _crossing(items["qdrant_p99_ms"], LATENCY_BUDGET_MS),
        "items_at_qdrant_p50_budget": _crossing(items["qdrant_p50_ms"], LATENCY_BUDGET_MS),
        "items_at_numpy_p99_budget": _crossing(items["numpy_p99_ms"], LATENCY_BUDGET_MS),
        "items_at_qdrant_5ms_p99": _crossing(items["qdrant_p99_ms"], 5.0),
        "memory_gib": mem_gib,
        "items_filling_memory_resident": _crossing(items["resident_mib"], mem_mib),
        "users_filling_memory_als": None if als_nnz is None else als_nnz / per_user,
    }


def served_dim() -> int:
    """The item-vector size of the newest full bundle, else the constant measured on it."""
    import json

    from anime2vec.bundle import newest_bundle
    from anime2vec.paths import default_model_store

    try:
        b = newest_bundle(default_model_store(), "full")
        if b is not None:
            return int(json.loads((b / "manifest.json").read_text())["dims"]["tower_dim"])
    except Exception:  # an unreadable store: the constant is the same number
        pass
    return SERVED_DIM


if __name__ == "__main__":
    sys.exit(_child())

"""The accuracy/diversity trade-off of the ranker's diversity knob, measured offline.

For each query of a scenario the model's top-`pool` candidates (POOL = the ranker's default
`rerank_pool`: the min-max normalisation of the scores depends on the pool) are re-ranked with
MMR at each λ using the SAME function the ranker serves (anime2vec.models.mmr;
`RecommendOptions.diversity` is λ), in the same content space (the bundle's centred text
vectors, where intra-list diversity is measured too). Per λ: recall@K
(accuracy of the long list), recall@k of the short list people see, intra-list diversity@k,
catalogue coverage@k and, given popularity, the mean popularity percentile@k.

Queries, candidates, exclusions and the seeded tie order are those of protocol.Experiment, so
λ = 0 reproduces the evaluation's numbers for the model (recall@K exactly; the top-k metrics at
the same k). A 2-d plot (diversity on x, accuracy on y, one labelled point per λ, one line per
scenario) goes with a markdown table.

    from anime2vec.evaluation.tradeoff import run_tradeoff
    df = run_tradeoff(model, [s for s in scenarios(ds, "test") if s.name in ("warm", "fav_k5")],
                      content=content_vectors, out_dir=report_dir / "tradeoff", popularity=ds.popularity)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..models.base import Recommender  # noqa: E402
from ..models.mmr import cosine_matrix, mmr_order  # noqa: E402
from . import metrics  # noqa: E402
from .protocol import Scenario, seeded_rng  # noqa: E402

LAMBDAS = tuple(round(0.1 * i, 1) for i in range(10))  # 0, 0.1, ..., 0.9
POOL = 500  # services/ranker/settings.py RankerSettings.rerank_pool's default


def tradeoff_curve(
    model: Recommender,
    scenario: Scenario,
    content: np.ndarray,
    lambdas: Sequence[float] = LAMBDAS,
    pool: int = POOL,
    k_recall: int = 100,
    k_list: int = 10,
    popularity: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 512,
    mmr_batch: int = 64,
) -> pd.DataFrame:
    """One row per λ: lambda, recall@k_recall, recall@k_list, diversity@k_list, coverage@k_list,
    [popularity_pct@k_list], n_queries, scenario, model, pool.

    content: (n_items, d) item content vectors (MMR similarity and intra-list diversity).
    batch_size must equal the Experiment's for λ = 0 to reproduce its numbers exactly (the
    seeded tie order is drawn per batch)."""
    lambdas = [float(x) for x in lambdas]
    if not lambdas or any(not 0 <= x <= 1 for x in lambdas):
        raise ValueError(f"lambdas must be in [0, 1], got {lambdas}")
    if pool < max(k_recall, k_list):
        raise ValueError(f"pool {pool} must be at least k_recall {k_recall} and k_list {k_list}")
    content = np.asarray(content, np.float32)
    n_items = content.shape[0]
    k_keep = max(k_recall, k_list)
    tops: dict[float, list[np.ndarray]] = {lam: [] for lam in lambdas}
    n = len(scenario.users)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        q = scenario.queries.slice(start, stop)
        cands = (
            seeded_rng(seed, f"ties/{scenario.name}/{start}").permutation(scenario.candidates)
            if scenario.shuffle
            else scenario.candidates
        )
        ex = None if scenario.exclude is None else scenario.exclude[start:stop]
        ranked, scores = model.recommend(q, k=pool, items=cands, exclude=ex, batch_size=batch_size)
        for a in range(0, len(ranked), mmr_batch):
            r, s = ranked[a : a + mmr_batch], scores[a : a + mmr_batch]
            vecs = np.where((r >= 0)[..., None], content[np.clip(r, 0, n_items - 1)], 0.0)
            sim = cosine_matrix(vecs) if any(lam > 0 for lam in lambdas) else None
            for lam in lambdas:
                order = mmr_order(s, sim, lam, k=k_keep)
                picked = np.take_along_axis(r, np.clip(order, 0, None), axis=1)
                tops[lam].append(np.where(order >= 0, picked, -1))
    rows = []
    for lam in lambdas:
        top = np.vstack(tops[lam]) if tops[lam] else np.zeros((0, k_keep), np.int64)
        row = {
            "lambda": lam,
            f"recall@{k_recall}": metrics.recall_at_k(top, scenario.truth, k_recall),
            f"recall@{k_list}": metrics.recall_at_k(top, scenario.truth, k_list),
            f"diversity@{k_list}": metrics.intra_list_diversity(top[:, :k_list], content),
            f"coverage@{k_list}": metrics.catalogue_coverage(top[:, :k_list], len(scenario.candidates)),
        }
        if popularity is not None:
            row[f"popularity_pct@{k_list}"] = metrics.popularity_percentile(top[:, :k_list], popularity)
        rows.append(row | {"n_queries": n, "scenario": scenario.name, "model": model.name, "pool": pool})
    return pd.DataFrame(rows)


def run_tradeoff(
    model: Recommender,
    scenarios: Scenario | Sequence[Scenario],
    content: np.ndarray,
    out_dir: str | Path | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    pool: int = POOL,
    k_recall: int = 100,
    k_list: int = 10,
    popularity: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 512,
    command: str = "",
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """The trade-off curve of `model` on each scenario (`tradeoff_curve`), concatenated; with
    out_dir, also written there as tradeoff.md, tradeoff.csv and tradeoff.png."""
    scs = [scenarios] if isinstance(scenarios, Scenario) else list(scenarios)
    if not scs:
        raise ValueError("no scenario given")
    df = pd.concat(
        [
            tradeoff_curve(model, sc, content, lambdas, pool, k_recall, k_list, popularity, seed, batch_size)
            for sc in scs
        ],
        ignore_index=True,
    )
    if out_dir is not None:
        write_tradeoff(df, out_dir, k_recall=k_recall, k_list=k_list, command=command, notes=notes)
    return df


def plot_tradeoff(df: pd.DataFrame, path: str | Path, k_recall: int = 100, k_list: int = 10) -> Path:
    """Accuracy (recall@k_recall) against diversity (ILD@k_list), one labelled point per λ, one
    line per scenario."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 5))
    for scenario, g in df.groupby("scenario", sort=False):
        g = g.sort_values("lambda")
        x, y = g[f"diversity@{k_list}"].to_numpy(), g[f"recall@{k_recall}"].to_numpy()
        ax.plot(x, y, marker="o", label=scenario)
        for lam, xi, yi in zip(g["lambda"], x, y):
            ax.annotate(f"λ={lam:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    model = ", ".join(pd.unique(df["model"]))
    ax.set_xlabel(f"intra-list diversity@{k_list} (cosine distance, content space)")
    ax.set_ylabel(f"recall@{k_recall}")
    ax.set_title(f"MMR accuracy/diversity trade-off ({model})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tradeoff(
    df: pd.DataFrame,
    out_dir: str | Path,
    k_recall: int = 100,
    k_list: int = 10,
    command: str = "",
    notes: Sequence[str] = (),
) -> Path:
    """tradeoff.md (a table per scenario), tradeoff.csv and tradeoff.png under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "tradeoff.csv", index=False)
    plot_tradeoff(df, out / "tradeoff.png", k_recall, k_list)
    cols = ["lambda"] + [c for c in df.columns if "@" in c]
    lines = ["# MMR accuracy/diversity trade-off", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Model: {', '.join(pd.unique(df['model']))} · candidates re-ranked per query: "
        f"{', '.join(str(p) for p in pd.unique(df['pool']))} · λ = the ranker's `diversity` option",
        "",
    ]
    lines += [f"- {x}" for x in notes]
    lines += ["", "![trade-off](tradeoff.png)", ""]
    for scenario, g in df.groupby("scenario", sort=False):
        lines += [
            f"## {scenario} ({int(g['n_queries'].iloc[0])} queries)",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---:|" * len(cols),
        ]
        for _, row in g.iterrows():
            lines.append("| " + " | ".join(_fmt(c, row[c]) for c in cols) + " |")
        lines.append("")
    (out / "tradeoff.md").write_text("\n".join(lines))
    return out


def _fmt(col: str, v) -> str:
    if col == "lambda":
        return f"{v:g}"
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.1f}" if col.startswith("popularity_pct") else f"{v:.4f}"

"""Write an evaluation run as report.md (tables), report.json (everything) and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .protocol import FAMILIES, Results  # noqa: E402

# Metrics without a "better" direction are never bolded: a lower popularity percentile is less
# popularity-biased, not more accurate.
NO_DIRECTION = ("popularity_pct",)
DEFINITIONS = [
    "recall@k: |top-k ∩ relevant| / |relevant| per query (DropoutNet), mean over queries.",
    "ndcg@k: binary gains, ideal = min(k, |relevant|) hits on top.",
    "mrr: 1 / rank of the first relevant item in the full ranking of the candidates.",
    "coverage@k: share of the candidate items that appear in at least one top-k list.",
    "popularity_pct@k: mean percentile (0-100) of the recommended items' training popularity among all items.",
    "diversity@k: mean pairwise cosine distance within each top-k list, in one fixed content space for all models.",
    "Exact score ties are broken in a seeded random candidate order, the same for every model.",
]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _fmt(metric: str, v: float) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.1f}" if metric.startswith("popularity_pct") else f"{v:.4f}"


def _markdown_table(wide: pd.DataFrame, half_width: dict | None = None) -> list[str]:
    """models as rows, metrics as columns, the best value of each column in bold; half_width:
    (model, metric) → half the 95% interval, shown as ±."""
    cols = list(wide.columns)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    best = {c: wide[c].max() for c in cols if not c.startswith(NO_DIRECTION)}
    for model, row in wide.iterrows():
        cells = []
        for c in cols:
            text = _fmt(c, row[c])
            if c in best and math.isfinite(row[c]) and row[c] == best[c] and len(wide) > 1:
                text = f"**{text}**"
            hw = (half_width or {}).get((model, c))
            if hw is not None and math.isfinite(hw):
                text += f" ±{hw:.3f}"
            cells.append(text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _half_widths(results: Results, scenario: str) -> dict:
    t = results.table
    if "ci_low" not in t:
        return {}
    t = t[(t["scenario"] == scenario) & (t["metric"] == HEADLINE_METRIC)]
    return {(r.model, r.metric): (r.ci_high - r.ci_low) / 2 for r in t.itertuples()}


SERVED = "anime2vec-hybrid"
HEADLINE_METRIC = "recall@100"


def served_vs_best(results: Results, served: str = SERVED, metric: str = HEADLINE_METRIC) -> pd.DataFrame:
    """Per scenario: the served model against the best other model, both with their 95% bootstrap
    intervals over users; verdict "win" / "loss" when the intervals do not overlap, else "tie"."""
    t = results.table[results.table["metric"] == metric]
    if served not in set(t["model"]):
        return pd.DataFrame()
    rows = []
    for sc in results.scenarios["name"]:
        g = t[t["scenario"] == sc].set_index("model")
        if served not in g.index or len(g) < 2:
            continue
        others = g.drop(index=served)
        best = others["value"].idxmax()
        s, b = g.loc[served], others.loc[best]
        lo_s, hi_s = s.get("ci_low", np.nan), s.get("ci_high", np.nan)
        lo_b, hi_b = b.get("ci_low", np.nan), b.get("ci_high", np.nan)
        verdict = "win" if lo_s > hi_b else "loss" if hi_s < lo_b else "tie"
        rows.append(
            {
                "scenario": sc,
                "served": float(s["value"]),
                "served_ci": (float(lo_s), float(hi_s)),
                "best_baseline": best,
                "baseline": float(b["value"]),
                "baseline_ci": (float(lo_b), float(hi_b)),
                "delta": float(s["value"] - b["value"]),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def served_vs_best_markdown(results: Results, served: str = SERVED, metric: str = HEADLINE_METRIC) -> list[str]:
    df = served_vs_best(results, served, metric)
    if df.empty:
        return []
    ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]" if all(math.isfinite(x) for x in c) else ""  # noqa: E731
    lines = [
        "",
        f"## The served model against the best baseline ({metric}, 95% bootstrap intervals over users)",
        "",
        f"| scenario | {served} | best other model | Δ | verdict |",
        "|---|---:|---|---:|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.scenario} | {r.served:.4f} {ci(r.served_ci)} | {r.best_baseline} {r.baseline:.4f} "
            f"{ci(r.baseline_ci)} | {r.delta:+.4f} | {r.verdict} |"
        )
    lines.append("")
    lines.append("win / loss: the intervals do not overlap; tie: they do.")
    return lines


def _markdown(results: Results, title: str, command: str, dataset_description: dict) -> str:
    r = results
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Split: **{r.split}** · seed {r.seed} · ks {list(r.ks)} · "
        f"max queries per family: {r.max_queries if r.max_queries is not None else 'all'}",
        "",
        "## Dataset",
        "",
        "| | |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in dataset_description.items()]
    lines += served_vs_best_markdown(r)
    lines += ["", "## Models", "", "| model | parameters | fit seconds |", "|---|---|---:|"]
    for name, info in r.models.items():
        fit = info.get("fit_seconds")
        params = json.dumps(_jsonable(info.get("params", {})), sort_keys=True)
        lines.append(f"| {name} | `{params}` | {'fitted before' if fit is None else f'{fit:.1f}'} |")
    for family, heading in FAMILIES.items():
        scs = r.scenarios[r.scenarios["family"] == family]
        if scs.empty:
            continue
        lines += ["", f"## {heading}"]
        for sc in scs.itertuples():
            lines += [
                "",
                f"### {sc.name}",
                "",
                f"{sc.description}; {sc.n_queries} queries, {sc.n_candidates} candidates.",
                "",
            ]
            lines += _markdown_table(r.metrics(sc.name), _half_widths(r, sc.name))
    lines += _deepaninet_markdown(r)
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    lines += ["", "## Metrics", ""] + [f"- {d}" for d in DEFINITIONS]
    return "\n".join(lines) + "\n"


# DeepAniNet's ablation (content representation of the DropoutNet item tower) on our protocol:
# (row label, model names in preference order; the first one present in the run fills the row).
DEEPANINET_ROWS = [
    ("TF-IDF", ("dropoutnet-tfidf",)),
    ("TF-IDF + graph", ("dropoutnet-tfidf-graph",)),
    ("static MiniLM", ("dropoutnet-minilm",)),
    ("static MiniLM + graph", ("dropoutnet-minilm-graph",)),
    ("pre-trained MiniLM (in-domain MLM)", ("dropoutnet-pretrained",)),
    ("pre-trained MiniLM + graph", ("dropoutnet-pretrained-graph",)),
    ("best combination (served hybrid)", ("anime2vec-hybrid",)),
    ("baseline: content-kNN TF-IDF", ("content-knn-tfidf",)),
    ("baseline: content-kNN TF-IDF + graph", ("content-knn-tfidf-graph",)),
    ("baseline: WMF", ("wmf",)),
]
DEEPANINET_COLUMNS = [
    ("cold_whole", "recall@100", "cold whole R@100"),
    ("cold_whole_nofranchise", "recall@100", "cold whole, no franchise R@100"),
    ("cold_test_items", "recall@100", "cold test-only R@100"),
    ("warm", "recall@100", "warm R@100"),
    ("fav_k5", "recall@100", "fav k5 R@100"),
    ("warm", "coverage@20", "warm coverage@20"),
    ("warm", "diversity@20", "warm ILD@20"),
]


def deepaninet_table(results: Results) -> pd.DataFrame:
    """One row per DeepAniNet variant present in the run, the columns above (NaN where absent)."""
    t = results.table
    value = {(r.model, r.scenario, r.metric): float(r.value) for r in t.itertuples()}
    rows = []
    for label, names in DEEPANINET_ROWS:
        model = next(
            (n for n in names if (n, "warm", "recall@100") in value or (n, "cold_whole", "recall@100") in value), None
        )
        if model is None:
            continue
        rows.append(
            {
                "variant": label,
                "model": model,
                **{col: value.get((model, sc, m), float("nan")) for sc, m, col in DEEPANINET_COLUMNS},
            }
        )
    return pd.DataFrame(rows)


def _deepaninet_markdown(results: Results) -> list[str]:
    table = deepaninet_table(results)
    if table.empty or len(table) < 2:
        return []
    wide = table.set_index("variant").drop(columns="model")
    lines = [
        "",
        "## DeepAniNet's table on our data",
        "",
        "DropoutNet item-tower content variants (rows) and baselines; model names: "
        + ", ".join(f"{r.variant} = `{r.model}`" for r in table.itertuples())
        + ".",
        "",
    ]
    return lines + _markdown_table(wide)


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_curves(results: Results, path: Path) -> None:
    names = list(results.scenarios["name"])
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        sub = results.curves[results.curves["scenario"] == name]
        for model, g in sub.groupby("model", sort=False):
            ax.plot(g["k"], g["recall"], label=model)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"recall@K ({results.split} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_diversity(results: Results, path: Path) -> None:
    k = results.ks[0]
    t = results.table
    y_metric = f"diversity@{k}" if (t["metric"] == f"diversity@{k}").any() else f"coverage@{k}"
    names = list(results.scenarios["name"])
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        wide = results.metrics(name)
        for model, row in wide.iterrows():
            ax.scatter(row[f"recall@{k}"], row[y_metric])
            ax.annotate(
                model, (row[f"recall@{k}"], row[y_metric]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"recall@{k}")
        ax.set_ylabel(y_metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{y_metric} vs recall@{k} ({results.split} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Results, out_dir: str | Path, title: str, command: str, dataset_description: dict
) -> list[Path]:
    """Write report.md, report.json, recall_curves.png and diversity_accuracy.png into out_dir
    (created if needed) and return their paths in that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    curves_png, div_png = out / "recall_curves.png", out / "diversity_accuracy.png"
    md.write_text(_markdown(results, title, command, dataset_description), encoding="utf-8")
    curves = {
        name: {model: g.sort_values("k")["recall"].tolist() for model, g in sub.groupby("model", sort=False)}
        for name, sub in results.curves.groupby("scenario", sort=False)
    }
    doc = {
        "title": title,
        "command": command,
        "split": results.split,
        "seed": results.seed,
        "ks": list(results.ks),
        "max_queries": results.max_queries,
        "dataset": dataset_description,
        "models": results.models,
        "scenarios": results.scenarios.to_dict(orient="records"),
        "metrics": results.table.to_dict(orient="records"),
        "recall_curves": curves,
        "timings": results.timings.to_dict(orient="records"),
        "notes": results.notes,
        "deepaninet_table": deepaninet_table(results).to_dict(orient="records"),
        "served_vs_best": served_vs_best(results).to_dict(orient="records"),
    }
    js.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False), encoding="utf-8")
    _plot_curves(results, curves_png)
    _plot_diversity(results, div_png)
    return [md, js, curves_png, div_png]

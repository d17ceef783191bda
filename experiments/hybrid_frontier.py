"""The served hybrid's warm-vs-cold trade-off in the whole catalogue, on VALIDATION only.

    python -m experiments.hybrid_frontier [--selection reports/full-seed0/selection.json] [--out reports/frontier]

A known user's list ranks every anime, warm and cold, so the report's `warm` and `cold_whole` /
`new_whole` columns compete for the same 100 places: raising the cold groups' offsets puts more
cold anime in every list, which the cold columns reward and the warm column pays for. This script
refits the served hybrid as the run in `--selection` chose it (EASE λ, content model, weights and
calibration from its `selection.json`; the same data, seed and validation queries), then moves
both cold groups' offsets of the known-user request together by Δ and records, for each Δ, the
validation recall@100 of warm, cold_whole, new_whole, cold among cold, and the next-interaction
mix stage 2 maximises. The baselines' validation points come from the same `selection.json`.

Also checks the weights `selection.json` reports as saturated (on the edge of their grid): stage
2's objective with each one moved one step beyond its grid, offsets re-ascended.

Nothing here reads the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np

from anime2vec.models.bilinear import ContentBilinear
from anime2vec.models.ease import EASE
from anime2vec.models.hybrid import GRIDS, Hybrid
from anime2vec.pipeline import SERVING_MODEL, HybridObjective, TrainConfig, _val_scenarios, mix_scenarios, prepare

log = logging.getLogger("hybrid_frontier")

SHIFTS = tuple(float(x) for x in np.round(np.arange(-1.0, 6.01, 0.25), 2))
COLUMNS = ("warm", "cold_whole", "new_whole", "cold_test_items", "mix", "mix_new")
TARGETS = {"warm": "own", "cold_whole": "cold", "new_whole": "new", "cold_test_items": "cold_items"}


def refit(selection: dict, cfg: TrainConfig) -> tuple[Hybrid, HybridObjective]:
    """The hybrid `selection` describes, fitted on cfg's data and split, and stage 2's validation
    objective over it (the same scenarios and queries `fit_hybrid` tunes on)."""
    sel = selection[SERVING_MODEL]["params"]
    p = prepare(cfg)
    t0 = time.perf_counter()
    ease = EASE(lam=float(sel["cf"]["lambda"]), seed=cfg.seed).fit(p.ds.train)
    content = ContentBilinear(
        p.content, seed=cfg.seed, lam=float(sel["content"]["lambda"]), mu=float(sel["content"]["mu"])
    ).fit(p.ds.train)
    hy = Hybrid(ease.factored(int(sel["cf"]["rank"])), content, graph=p.graph, content_rank=sel["content_rank"])
    hy.fit(p.ds.train).set_params(sel)
    log.info("hybrid refitted in %.0f s", time.perf_counter() - t0)
    scs = _val_scenarios(p) + mix_scenarios(p.ds, cfg.seed, cfg.val_queries)
    return hy, HybridObjective(hy, p.ds, scs)


def measure(hy: Hybrid, obj: HybridObjective) -> dict[str, float]:
    w = hy.weights["users"]

    def run(target: str) -> float:
        return obj(lambda parts: hy.combine(parts, w), "users", target)

    out = {col: run(t) for col, t in TARGETS.items()}
    out["mix"], out["mix_new"] = run("mix"), run("mix_new")
    out["stage2"] = (out["mix"] + out["mix_new"] + out["cold_test_items"]) / 3
    return out


def frontier(hy: Hybrid, obj: HybridObjective) -> list[dict]:
    w = hy.weights["users"]
    base = dict(w.offset)
    rows = []
    for d in SHIFTS:
        w.offset = {"warm": 0.0, "paired": base["paired"] + d, "text": base["text"] + d}
        rows.append({"shift": d, **measure(hy, obj)})
        log.info("Δ %+.2f %s", d, {k: round(v, 4) for k, v in rows[-1].items() if k != "shift"})
    w.offset = base
    return rows


def saturation(hy: Hybrid, obj: HybridObjective) -> list[dict]:
    """Stage 2's objective with each saturated item-side weight one step past its grid (offsets
    re-ascended from the selected ones)."""
    w = hy.weights["users"]
    base_items, base_offset = copy.deepcopy(hy.items), dict(w.offset)
    beyond = {
        ("beta_content", "paired"): (16.0, 24.0),
        ("beta_content", "text"): (6.0, 8.0),
        ("beta_cf", "paired"): (0.25, 0.0),
    }
    rows = [{"change": "as selected", **measure(hy, obj)}]
    for (kind, g), values in beyond.items():
        for v in values:
            hy.items, w.offset = copy.deepcopy(base_items), dict(base_offset)
            getattr(hy.items, kind)[g] = v

            def stage2() -> float:
                return measure(hy, obj)["stage2"]

            Hybrid._ascend(stage2, [(w.offset, "text", GRIDS["offset"]), (w.offset, "paired", GRIDS["offset"])], 2)
            rows.append(
                {"change": f"{kind}.{g}={v} (offsets {w.offset['paired']}, {w.offset['text']})", **measure(hy, obj)}
            )
            log.info("%s", rows[-1])
    hy.items, w.offset = base_items, base_offset
    return rows


def plot(rows: list[dict], baselines: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, col, title in (
        (axes[0], "cold_whole", "cold anime (with pairs)"),
        (axes[1], "new_whole", "brand-new anime"),
    ):
        ax.plot([r[col] for r in rows], [r["warm"] for r in rows], "o-", ms=3, label="hybrid, cold offsets + Δ")
        sel = next(r for r in rows if r["shift"] == 0.0)
        ax.plot([sel[col]], [sel["warm"]], "r*", ms=14, label="hybrid as served (Δ = 0)")
        for name, v in baselines.items():
            if v.get(col, 0) > 0 or name in ("wmf", "ease"):
                ax.plot([v[col]], [v["warm"]], "s", ms=6)
                ax.annotate(name, (v[col], v["warm"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{col} recall@100 (validation)")
        ax.set_ylabel("warm recall@100 (validation)")
        ax.set_title(f"known users, whole catalogue: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)


def table(rows: list[dict], key: str, cols: tuple[str, ...]) -> str:
    head = f"| {key} | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    return head + "".join(
        f"| {r[key] if isinstance(r[key], str) else f'{r[key]:+.2f}'} | "
        + " | ".join(f"{r[c]:.3f}" for c in cols)
        + " |\n"
        for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selection", type=Path, default=Path("reports/full-seed0/selection.json"))
    ap.add_argument("--data-dir", type=Path, help="MAL data directory (default: A2V_DATA_DIR or ../shared/data/mal)")
    ap.add_argument("--out", type=Path, default=Path("reports/frontier"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    selection = json.loads(a.selection.read_text())
    hy, obj = refit(selection, TrainConfig(data_dir=a.data_dir, models=(SERVING_MODEL,)))
    rows = frontier(hy, obj)
    sat = saturation(hy, obj)
    a.out.mkdir(parents=True, exist_ok=True)
    baselines = {k: v for k, v in selection["val_final"].items() if k != SERVING_MODEL}
    (a.out / "frontier.json").write_text(
        json.dumps({"frontier": rows, "saturation": sat, "baselines": baselines}, indent=1)
    )
    plot(rows, baselines, a.out)
    cols = ("warm", "cold_whole", "new_whole", "cold_test_items", "stage2")
    md = "# The hybrid's warm / cold trade-off (validation)\n\n" + table(rows, "shift", cols)
    md += "\n## Saturated weights, one step past the grid\n\n" + table(sat, "change", cols)
    md += (
        "\n## Baselines (validation, same queries)\n\n| model | warm | cold_whole | new_whole |\n|---|---:|---:|---:|\n"
    )
    md += "".join(
        f"| {k} | {v['warm']:.3f} | {v['cold_whole']:.3f} | {v['new_whole']:.3f} |\n" for k, v in baselines.items()
    )
    (a.out / "frontier.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

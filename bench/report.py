"""Writes a bench result as JSON, a markdown table and PNG bar charts under one directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def markdown(result: dict) -> str:
    lines = [f"# anime2vec bench ({result['machine']['summary']})", ""]
    s = result.get("search")
    if s:
        lines += [f"## Ranker search: {s['items']} items × {s['dim']} dims, top-{s['top_k']}, {s['queries']} queries",
                  "", "| case | p50 ms | p99 ms |", "|---|---:|---:|"]
        lines += [f"| {name} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} |" for name, c in s["cases"].items()]
        lines += ["", f"- qdrant / numpy p50: **{s['ratio_p50']['unfiltered']:.2f}×** unfiltered, "
                      f"**{s['ratio_p50']['filtered']:.2f}×** filtered "
                      f"({s['filter']['matching_items']} items match the filter)",
                  f"- recall@{s['top_k']} of Qdrant vs exact numpy: {s['recall_at_100']['unfiltered']:.3f} unfiltered, "
                  f"{s['recall_at_100']['filtered']:.3f} filtered", ""]
    e = result.get("encoder")
    if e:
        lines += [f"## Encoder: {e['model']} on {e['device']}, {e['texts']} synopses, batch {e['batch_size']}",
                  "", "| loop | texts/s |", "|---|---:|"]
        lines += [f"| {name} | {rate:.1f} |" for name, rate in e["texts_per_s"].items()]
        lines += ["", f"- encode() / plain loop: **{e['speedup']:.2f}×** (best of {e['rounds']} rounds each)",
                  f"- lowest cosine between the two loops' vectors: {e['min_cosine_encoder_vs_plain']:.6f}", ""]
    return "\n".join(lines)


def _bar(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    written[0].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(result), encoding="utf-8")
    device = result["machine"]["summary"]
    if s := result.get("search"):
        cases = list(s["cases"])
        path = out_dir / "search_latency.png"
        _bar(path, cases, {q: [s["cases"][c][f"{q}_ms"] for c in cases] for q in ("p50", "p99")},
             "latency (ms)", f"top-{s['top_k']} search, {s['items']} items ({device})")
        written.append(path)
    if e := result.get("encoder"):
        path = out_dir / "encoder_throughput.png"
        names = list(e["texts_per_s"])
        _bar(path, names, {"texts/s": [e["texts_per_s"][n] for n in names]},
             "texts/s", f"{e['model']}, {e['texts']} synopses ({e['device']})")
        written.append(path)
    return written

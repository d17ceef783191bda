"""Writes a bench result as JSON, a markdown report and PNG plots under one directory. Every figure
is shown beside the baseline measured in the same run; extrapolated scale points are marked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int,)) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _size(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


# ---- markdown --------------------------------------------------------------------------------
def _md_search(s: dict) -> list[str]:
    t = s.get("targets", {})
    lines = [
        f"## Ranker search: {s['items']:,} items × {s['dim']} dims, {s['queries']} queries",
        "",
        f"Vectors: {s['source']}.",
        "Baseline: exact numpy dot-product top-k over the same vectors (float32 BLAS). Modes: `exact` (served by "
        "default, from the vectors in memory: `ranker in-memory`; Qdrant's exact scan with "
        "A2V_RANKER_SEARCH_IN_MEMORY=false) scans every float32 vector; `quantized` scans int8 copies and rescores the best "
        f"{s['oversampling']:g}× the page in float32 (at most 400 vectors: top-100 rescores 4×). Cases run "
        "interleaved query by query in an order shuffled per query, so a stall of the machine, and what the case "
        "before left in the caches, fall on all alike. The int8 read floor sums a copy of the codes' bytes "
        "allocated as the ranker's codes are (huge pages where the kernel gives them). "
        f"Filtered: {', '.join(s['filter']['include_genres'])}, "
        f"{s['filter']['year_min']}–{s['filter']['year_max']} ({s['filter']['matching_items']:,} items match).",
        "",
        "| case | p50 ms | p99 ms | p50 / numpy | recall vs exact |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in s["cases"].items():
        ratio = s["ratio_p50_to_numpy"].get(name)
        rec = s["recall"].get(name)
        lines.append(
            f"| {name} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {'–' if ratio is None else f'{ratio:.2f}×'} "
            f"| {'–' if rec is None else f'{rec:.4f}'} |"
        )
    if p := s.get("peers"):
        u, f = p["unfiltered"], p["filtered"]
        lines += [
            "",
            f"Against the tools a user would pick instead (p50, served `{s['served_mode']}` mode, top-{s['served_page']}, "
            "everything on one thread):",
            "",
            f"- unfiltered (served by `{u.get('served_case', 'qdrant')}`): {u['served_p50_ms']:.2f} ms = "
            f"{u['vs_int8_read_floor']:.1f}× the int8 read floor (target "
            f"≤ {t['floor_ratio']:g}×: {_yes(t.get('floor_met'))}; {u.get('vs_float32_read_floor', float('nan')):.1f}× "
            f"one pass over the float32 vectors; search precision {s.get('search_precision', 'float32')}: "
            f"{u.get('vs_float32_in_memory', float('nan')):.2f}× the same search in float32), "
            f"{u['vs_numpy_1_thread']:.1f}× numpy, {u['vs_faiss_flat']:.1f}× faiss flat"
            + (
                f"; per query against the floor pass of the same round, median {u['paired_vs_int8_read_floor']:.2f}×"
                if "paired_vs_int8_read_floor" in u
                else ""
            ),
            f"- filtered (served by `{f.get('served_case', 'qdrant')}`): {f['served_p50_ms']:.2f} ms = "
            f"{f['vs_numpy_matching_rows']:.2f}× numpy over the matching rows "
            f"(target ≤ {t['filtered_ratio']:g}×: {_yes(t.get('filtered_met'))}), {f['vs_faiss_id_selector']:.1f}× faiss "
            f"with an id selector, {f['vs_numpy_scan_all_and_mask']:.1f}× numpy scanning everything then masking"
            + (
                f"; per query, median {f['paired_vs_numpy_matching_rows']:.2f}× numpy over the matching rows"
                if "paired_vs_numpy_matching_rows" in f
                else ""
            ),
            f"- served recall: {t.get('served_recall', float('nan')):.4f} at top-{s['served_page']}, "
            f"{t.get('served_recall_top100', float('nan')):.4f} at top-100 (target 1.0 / ≥ 0.999: "
            f"{_yes(t.get('served_recall_met'))})",
        ]
    lines += [
        "",
        f"- exact mode recall: {t.get('exact_recall', float('nan')):.4f} — target 1.0: {_yes(t.get('recall_met'))}",
        f"- served mode ({s.get('served_mode', 'quantized')}) at the served page (top-{s.get('served_page', 11)}, filtered or not): "
        f"worst p99 {t.get('served_p99_ms', float('nan')):.2f} ms — target "
        f"≤ {t.get('p99_ms', 5):g} ms: {_yes(t.get('p99_met'))}; worst recall {t.get('served_recall', float('nan')):.4f}",
        "",
    ]
    return lines


def _md_encoder(e: dict) -> list[str]:
    p = e["padding"]
    check = e.get("precision_check") or {}
    lines = [
        f"## Encoder: {e['model']} on {e['device']}"
        + (f" ({e['cuda']})" if e.get("cuda") else " (cuda: not available)"),
        "",
        f"{e['texts']} texts ({e['text_source']}), max_length {e['max_length']}, batch {e['batch_size']}, "
        f"{e['torch_threads']} torch threads, best of {e['rounds']} alternating round(s), {e['clock']}.",
        "Baseline: `sentence-transformers` `encode` on the same weights and texts (the library a user would "
        "pick). `encoder` is `TextEncoder` as the encoder service runs it (precision "
        f"**{e['precision']}**, chosen at start-up"
        + (
            f": native bf16 {check.get('native_bf16')}, probe min cosine vs fp32 {check['min_cosine_vs_fp32']:.6f}"
            if check.get("min_cosine_vs_fp32") is not None
            else ""
        )
        + "); `plain` is the textbook transformers eager loop.",
        "",
        "| loop | texts/s (best) | texts/s (median) | lowest cosine vs sentence-transformers |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in e["texts_per_s"].items():
        cos = e["min_cosine_vs_sentence_transformers"].get(name)
        lines.append(
            f"| {name} | {rate:.1f} | {e['median_texts_per_s'][name]:.1f} | {'–' if cos is None else f'{cos:.6f}'} |"
        )
    t = e["targets"]
    lines += [
        "",
        f"- encoder / sentence-transformers: **{e['speedup']:.2f}×** at min cosine "
        f"{e['min_cosine_vs_sentence_transformers']['encoder']:.6f} — target ≥ {t['speedup']:g}× at ≥ "
        f"{t['min_cosine']:g}: {_yes(t['speedup_met'])}",
        f"- the same in fp32: {e['speedup_fp32_vs_sentence_transformers']:.2f}×; encoder / plain loop: "
        f"{e['speedup_vs_plain']:.2f}×",
        f"- why: tokens through the model, plain {p['plain_padded_tokens']:,} vs bucketed "
        f"{p['bucketed_padded_tokens']:,} ({p['padded_tokens_ratio_plain_vs_bucketed']:.2f}×; real tokens "
        f"{p['real_tokens']:,}; token length p10/p50/p90 {p['tokens_p10']:.0f}/{p['tokens_p50']:.0f}/"
        f"{p['tokens_p90']:.0f}, {p['truncated_share']:.0%} truncated at {e['max_length']}); sentence-transformers "
        "sorts by length too, so the lead over it is the precision",
    ]
    if e.get("speedup_compiled") is not None:
        lines.append(
            f"- torch.compile: {e['speedup_compiled']:.2f}× sentence-transformers after {e['compile_s']:.0f} s "
            "of compiling"
        )
    else:
        lines.append("- torch.compile: not measured in this run (`--compile`)")
    return lines + [""]


def _md_encoder_cuda(e: dict) -> list[str]:
    batches = list(e["texts_per_s"]["encoder"])
    lines = [
        f"## Encoder on CUDA: {e['model']} on {e['cuda']}",
        "",
        f"{e['texts']:,} texts ({e['text_source']}), max_length {e['max_length']}, {e['clock']}, best of "
        f"{e['rounds']}; torch {e['torch']} (CUDA {e['cuda_runtime']})"
        + (f"; {e['how']}" if e.get("how") else "")
        + ". `encoder` is `TextEncoder` as the encoder service runs it on a GPU (precision "
        f"**{e['precision']}**, autocast); beside it the same in fp32, and sentence-transformers `encode` on the "
        "same GPU in fp32 (its default) and in fp16 (`.half()`, what a user would switch to).",
        "",
        "| loop | " + " | ".join(f"batch {b} (texts/s)" for b in batches) + " | lowest cosine vs CPU fp32 |",
        "|---|" + "---:|" * (len(batches) + 1),
    ]
    cpu = e.get("min_cosine_vs_cpu_fp32") or {}
    for name, rates in e["texts_per_s"].items():
        cos = cpu.get(name)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{rates[b]:,.0f}" for b in batches)
            + f" | {'–' if cos is None else f'{cos:.7f}'} |"
        )
    t = e["targets"]
    lines += [
        "",
        f"- served encoder: **{e['encoder_texts_per_s']:,.0f} texts/s** at batch {e['best_batch']} — target ≥ "
        f"{t['cuda_texts_per_s']:,} texts/s: {_yes(t['cuda_met'])}; "
        + ", ".join(
            f"{r:.1f}× sentence-transformers fp16 at batch {b}"
            for b, r in e["speedup_vs_sentence_transformers_fp16"].items()
        )
        + (f"; peak GPU memory {e['peak_memory_gib']:.1f} GiB" if e.get("peak_memory_gib") is not None else ""),
    ]
    if cpu:
        lines.append(
            f"- the GPU computes the CPU's vectors: lowest cosine of the served (fp16) vectors against fp32 "
            f"vectors made on a CPU, over {e['reference_texts']} texts: {cpu['encoder']:.7f}"
        )
    if (par := e.get("parallel_tokenizers")) and str(e["best_batch"]) in par["texts_per_s"]["encoder"]:
        r, b = par["texts_per_s"], str(e["best_batch"])
        lines.append(
            f"- beside it, the same loops with TOKENIZERS_PARALLELISM unset (the tokenizers library's default, "
            f"which a user of sentence-transformers would have; the project sets it false so that forked "
            f"processes stay safe): encoder {r['encoder'][b]:,.0f}, sentence-transformers fp16 "
            f"{r['sentence_transformers_fp16'][b]:,.0f} texts/s at batch {b} "
            f"({r['encoder'][b] / r['sentence_transformers_fp16'][b]:.1f}×)"
        )
    for svc in e.get("service") or []:
        lines.append(
            f"- the encoder service on {svc['info']['device']} ({svc['info']['precision']}), forward batch "
            f"{svc['encode_batch_size']}, micro-batches up to {svc['max_batch_texts']}: "
            f"{svc['texts_per_s']:,.0f} texts/s over gRPC ({svc['clients']} clients × {svc['request_texts']} "
            f"texts per request; lowest cosine vs in-process {svc['min_cosine_vs_in_process']:.6f})"
        )
    return lines + [""]


def _md_gateway(g: dict) -> list[str]:
    b, t = g["best"], g["targets"]
    half = g["open_loop_half_max"]
    lines = [
        f"## Gateway end to end: favourites query (Recommend, {g['request']['favourites_per_request']} "
        f"favourite ids, API key)",
        "",
        f"Bundle {g['bundle']['version']} ({g['bundle']['kind']}; {_f(g['bundle']['items'])} items, "
        f"{g['bundle']['vector_dim']}-dim vectors). Encoder, ranker and gateway as processes on loopback; "
        f"{g['server_settings']}.",
        f"Baseline: a trivial gRPC echo server (same grpcio and thread-pool settings, answers "
        f"{g['request']['reply_bytes']} bytes like the gateway, no work) driven the same way in the same run: "
        f"the Python gRPC ceiling here. Relay: a second such server that passes each call on to the echo "
        f"server over a blocking channel, as the gateway calls the ranker: the ceiling of two Python gRPC hops "
        f"with no work. The ranker called directly shows the gateway hop's cost.",
        f"Client: {g['client']}. Closed-loop steps of {g['step_s']:g} s after {g['warmup_s']:g} s warm-up, "
        f"the targets alternating at each step.",
        "",
        "| in flight | echo req/s | relay req/s | ranker req/s | gateway req/s | gateway / echo | gateway p50 ms "
        "| gateway p99 ms | echo p99 ms | client CPU (gateway step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    relay = g["sweep"].get("relay") or [{}] * len(g["sweep"]["echo"])  # reports from before the relay
    for e, rl, r, gw in zip(g["sweep"]["echo"], relay, g["sweep"]["ranker"], g["sweep"]["gateway"]):
        lines.append(
            f"| {gw['concurrency']} | {e['throughput_rps']:.0f} | {_f(rl.get('throughput_rps'), 0)} | "
            f"{r['throughput_rps']:.0f} | "
            f"{gw['throughput_rps']:.0f} | {gw['throughput_rps'] / e['throughput_rps']:.2f} | "
            f"{_f(gw.get('p50_ms'))} | {_f(gw.get('p99_ms'))} | {_f(e.get('p99_ms'))} | "
            f"{gw['client_cpu_share']:.0%} |"
        )
    og, oe = half.get("gateway", {}), half.get("echo", {})
    relay_best = f", relay {b['relay']['throughput_rps']:.0f}" if "relay" in b else ""
    relay_ratio = (
        f"; relay (two hops, no work) / echo: {g['ratio_relay_to_echo']:.2f}×, gateway / relay: "
        f"{g['ratio_gateway_to_relay']:.2f}×"
        if "ratio_relay_to_echo" in g
        else ""
    )
    lines += [
        "",
        f"- best throughput: gateway {b['gateway']['throughput_rps']:.0f} req/s (at {b['gateway']['concurrency']} "
        f"in flight), ranker {b['ranker']['throughput_rps']:.0f}{relay_best}, echo {b['echo']['throughput_rps']:.0f}",
        f"- gateway / echo ceiling: {g['ratio_gateway_to_echo']:.2f}× (context, no target: it mostly measures "
        f"Python gRPC on the shared cores; ranker alone / echo: {g['ratio_ranker_to_echo']:.2f}×{relay_ratio})",
        f"- open loop at half the gateway's best ({og.get('offered_rps', 0):.0f} req/s): gateway p50 "
        f"{_f(og.get('p50_ms'))} ms, **p99 {_f(og.get('p99_ms'))} ms** — target ≤ {t['p99_ms_at_half_max']:g} ms: "
        f"{_yes(t['p99_met'])}; echo at the same rate: p50 {_f(oe.get('p50_ms'))} ms, p99 {_f(oe.get('p99_ms'))} ms",
        f"- one request alone (1 in flight, p50): echo {_f(g['latency_c1_ms']['echo'], 2)} ms, ranker "
        f"{_f(g['latency_c1_ms']['ranker'], 2)} ms, gateway {_f(g['latency_c1_ms']['gateway'], 2)} ms",
        f"- errors: {g['errors']}",
    ]
    if (sb := g.get("search_batches")) and sb.get("mean"):
        lines.append(
            f"- the ranker's searches during the sweep: {sb['searches']:,.0f} in {sb['calls']:,.0f} engine calls, "
            f"{sb['mean']:.2f} per call (concurrent searches coalesced, A2V_RANKER_SEARCH_BATCH)"
        )
    rp = g.get("ranker_processes", {})
    if "ratio" in rp:
        per = ", ".join(
            f"{s['processes']}×{s['concurrency']} in flight: {s['throughput_rps']:.0f}" for s in rp["steps"]
        )
        lines.append(
            f"- ranker processes (the same bundle, each with its own copy of the embedded collection; one client "
            f"channel, round robin): 1 process {rp['best_rps']['1']:.0f} req/s, 2 processes {rp['best_rps']['2']:.0f} = "
            f"**{rp['ratio']:.2f}×** (ideal {rp['ideal']:g}× on {rp['cores']} cores; target ≥ "
            f"{t.get('two_processes', 1.7):g}×: {_yes(t.get('two_processes_met'))}); steps (processes × in flight: "
            f"req/s): {per}"
        )
        cpu = rp.get("best_cpu") or {}
        if all((cpu.get(n) or {}).get("ranker_cpu_ms_per_request") for n in ("1", "2")):
            lines.append(
                "- where the cores went at each best step: "
                + "; ".join(
                    f"{n} process{'es' if n == '2' else ''}: ranker CPU {c['ranker_cpu_ms_per_request']:.1f} ms per "
                    f"request, rankers {c['ranker_cores']:.2f} cores busy, load generator {c['client_cores']:.2f}"
                    for n, c in cpu.items()
                )
                + f" (of {rp['cores']})"
            )
    elif rp:
        lines.append(f"- ranker processes: not measured ({rp.get('error')})")
    prof = g.get("profile_ranker_in_process", {})
    if "cpu_ms_per_request" in prof:
        cpu, ratio = prof["cpu_ms_per_request"], prof["cpu_to_floor"]
        lines += [
            f"- the ranker's CPU per favourites request (in-process, the calling thread's CPU time, median of "
            f"{prof['calls']} rounds that run every kind of request once and a pass over the int8 vectors after the "
            f"plain one): {cpu['plain']:.2f} ms = **{ratio['plain']:.1f}×** one pass over the int8 vectors "
            f"({prof['int8_read_floor_ms']:.2f} ms, a request between passes"
            + (
                f"; back to back, cache-hot: {prof['int8_read_floor_back_to_back_ms']:.2f} ms"
                if "int8_read_floor_back_to_back_ms" in prof
                else ""
            )
            + f") — target ≤ {t.get('cpu_to_floor', 2.5):g}×: {_yes(t.get('cpu_to_floor_met'))}; with "
            f"explanations {cpu['explain']:.2f} ms ({ratio['explain']:.1f}×); with a selective filter (answered in "
            f"memory) {cpu['filtered']:.2f} ms ({ratio['filtered']:.1f}×)",
        ]
    if "top_self" in prof:
        lines += [
            "",
            f"Where the ranker's time goes (RecommendFromFavourites called in-process, no gRPC, "
            f"{prof['calls']} calls: p50 {prof['p50_ms']:.2f} ms, p99 {prof['p99_ms']:.2f} ms; cProfile, "
            f"self time per request):",
            "",
            "| function | ms / request | share | calls / request |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{r['function']}` | {r['self_ms_per_request']:.3f} | {r['self_share']:.0%} | "
            f"{r['calls_per_request']:g} |"
            for r in prof["top_self"][:8]
        ]
    elif prof:
        lines.append(f"- profile failed: {prof.get('error')}")
    if g.get("analysis"):
        lines += ["", *g["analysis"]]
    return lines + [""]


def _md_processes(p: dict) -> list[str]:
    b = p["bundle"]
    pin = p.get("pinning") or {}
    where = (
        f"{p['note']}: "
        + ", ".join(f"{k} on CPU {v}" for k, v in pin.get("rankers", {}).items())
        + f"; the load generator and the bench on CPUs {pin.get('load_generator')}"
        if p["pinned"]
        else f"**{p['note']}**"
    )
    lines = [
        "## Ranker processes: throughput as processes are added (RecommendFromFavourites)",
        "",
        f"Bundle {b['version']} ({b['kind']}; {_f(b['items'])} items, {b['vector_dim']}-dim vectors); "
        f"{p['machine']['cpu']}, {p['cores']} cores. {where}. Rankers {p['ranker_settings']}. "
        f"Client: {p['client']}. Steps of {p['step_s']:g} s after {p['warmup_s']:g} s warm-up at "
        f"{', '.join(map(str, p['in_flight_per_process']))} requests in flight per process, the counts alternating; "
        f"the rankers' CPU read from /proc over each counted window.",
        "",
        "| processes | best req/s | at in flight | × one process | ideal | efficiency | ranker CPU ms / request "
        "| rankers' cores busy | load generator cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in map(str, p["counts"]):
        c = p["best_cpu"][n]
        shared = (
            " (SMT siblings)"
            if any(s.get("smt_siblings_shared") for s in p["steps"] if str(s["processes"]) == n)
            else ""
        )
        lines.append(
            f"| {n}{shared} | {p['best_rps'][n]:.0f} | {p['best_at'][n]} | {_f(p['ratio_to_one'][n], 2)} | "
            f"{p['ideal_linear'][n]:g} | {_f(p['efficiency'][n], 2)} | {_f(c['ranker_cpu_ms_per_request'], 2)} | "
            f"{_f(c['ranker_cores'], 2)} | {_f(c['client_cores'], 2)}{' ⚠' if p['client_saturated'][n] else ''} |"
        )
    t = p["targets"]
    lines += [
        "",
        f"- 2 processes / 1: **{_f(p['ratio'], 2)}×** — target ≥ {t['two_processes']:g}×: {_yes(t['two_processes_met'])}"
        + ("" if p["pinned"] else " (measured on cores shared with the load generator)"),
        "- steps (processes × in flight: req/s): "
        + ", ".join(f"{s['processes']}×{s['concurrency']}: {s['throughput_rps']:.0f}" for s in p["steps"]),
    ]
    if any(p["client_saturated"].values()):
        lines.append(
            "- ⚠: a load-generator process was near a full core at that count's best step; it may be the limit"
        )
    return lines + [""]


def _md_training(t: dict) -> list[str]:
    d, enc, dn = t["data"], t["encoding"], t["dropoutnet"]
    lines = [
        f"## Training cost on the real data ({d['users']:,} users, {d['items']:,} items, "
        f"{d['train_nnz']:,} training positives)",
        "",
        f"Machine speed in the same run (baseline for the absolute times): float32 GEMM "
        f"{t['gemm_gflops_start']:.1f} GFLOP/s at the start, {t['gemm_gflops_end']:.1f} at the end.",
        "",
        "| step | time | note |",
        "|---|---:|---|",
        f"| load the MAL files | {t['load_s']:.1f} s | |",
        f"| splits + texts | {t['split_and_texts_s']:.1f} s | |",
    ]
    for w in t["wmf"]:
        lines.append(
            f"| WMF (ALS) iteration, rank {w['factors']} | {w['iteration_s']:.2f} s | "
            f"{w['ns_per_positive_per_factor']:.1f} ns per positive per factor; median of {w['iterations']} |"
        )
    lines += [
        f"| DropoutNet epoch | {dn['epoch_s']:.1f} s | {dn['steps_per_epoch']} steps of {dn['config']['batch_users']} "
        f"users ({dn['step_s'] * 1e3:.0f} ms/step); = {dn['epoch_vs_als_iteration']:.1f} ALS iterations; "
        f"first epoch with set-up {dn['first_epoch_s']:.1f} s; content: {dn['content']} |"
    ]
    if enc.get("lookup_s"):
        lines += [
            f"| encodings from the cache, all {enc['cached_texts']:,} texts | {enc['lookup_s']:.2f} s | "
            f"{enc['hits']:,} hits, {enc['lookup_ms_per_text'] * 1e3:.0f} µs/text |"
        ]
    lines += [
        f"| encodings fresh (MiniLM), all {d['texts']:,} texts | {enc['fresh_all_s_extrapolated'] / 60:.1f} min | "
        f"extrapolated from {enc['fresh_sample']} random texts at {enc['fresh_ms_per_text']:.0f} ms/text |",
        "",
    ]
    if enc.get("speedup_cache_vs_fresh"):
        lines.append(
            f"- encoding cache vs fresh encoding: **{enc['speedup_cache_vs_fresh']:,.0f}×** faster "
            f"(baseline: fresh encoding, same run)"
        )
    return lines + [""]


def _md_scale(s: dict) -> list[str]:
    sh = s["shape"]
    lines = [
        "## Scale curves (synthetic data shaped like the real one)",
        "",
        f"Shape from {sh['source']}: item popularity a power law with exponent {sh['popularity_exponent']:.2f} over "
        f"its body (flatter head; the real curve is stretched to each catalogue size), positives per user "
        f"drawn from the real distribution (mean {s['positives_per_user']:.0f} here; real mean "
        f"{sh['real'].get('mean_per_user', float('nan')):.0f}, median {sh['real'].get('median_per_user', float('nan')):.0f}), "
        f"real confidence values. *Italic* = extrapolated with the stated model, not measured.",
        "",
        f"### Items axis: embedded Qdrant (exact mode, the worst case) at {s['dim']} dims, favourites query (top {s['query']['limit']}, "
        f"{s['query']['excluded_ids']} ids excluded), {s['query']['queries']} queries",
        "",
        "Baselines: raw float32 vectors (memory) and exact numpy search (latency) on the same vectors.",
        "",
        "| items | build s | build peak MiB | resident MiB | raw vectors MiB | disk MiB | Qdrant p50 / p99 ms "
        "| numpy p50 / p99 ms | Qdrant / numpy p50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    it = s["items"]

    def at(c: dict, n: int):
        return next((p for p in c["points"] if p["size"] == n), None)

    measured_items = [p["n_items"] for p in s["measured"]["index"]]
    for n in sorted({*s["items_axis_sizes"], *measured_items}):
        cells = [
            at(it[k], n)
            for k in (
                "build_s",
                "build_peak_mib",
                "resident_mib",
                "disk_mib",
                "qdrant_p50_ms",
                "qdrant_p99_ms",
                "numpy_p50_ms",
                "numpy_p99_ms",
            )
        ]
        ext = any(c and c["extrapolated"] for c in cells)
        v = [c["value"] if c else None for c in cells]
        row = [
            _size(n),
            _f(v[0]),
            _f(v[1]),
            _f(v[2]),
            _f(n * s["dim"] * 4 / 2**20),
            _f(v[3]),
            f"{_f(v[4])} / {_f(v[5])}",
            f"{_f(v[6])} / {_f(v[7])}",
            f"{v[4] / v[6]:.2f}" if v[4] and v[6] else "–",
        ]
        lines.append("| " + " | ".join(f"*{c}*" if ext else c for c in row) + " |")
    idx = s["measured"]["index"]
    recalls = ", ".join(f"{p['recall_vs_numpy']:.3f}" for p in idx)
    lines += [
        "",
        f"- recall of Qdrant vs numpy (exact): {recalls}",
        f"- latency model: {it['qdrant_p99_ms']['model']} (x = items); the numpy baseline likewise",
        f"- memory and build-time model: {it['resident_mib']['model']} (x = items)",
        "",
    ]
    us = s["users"]
    lines += [
        f"### Users axis: {s['users_axis_items']:,} items, {s['positives_per_user']:.0f} positives per user",
        "",
        "Baselines: the CSR matrix's own bytes (memory); the real data's ALS iteration and DropoutNet epoch "
        "(training section) for time.",
        "",
        "| users | positives | ALS s / iteration (rank 32) | ALS peak MiB | CSR MiB | DropoutNet s / epoch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    measured_users = [p["n_users"] for p in s["measured"]["als"]]
    for n in sorted({*s["users_axis_sizes"], *measured_users}):
        cells = [at(us[k], n) for k in ("als_iteration_s", "als_peak_mib", "csr_mib", "dropoutnet_epoch_s")]
        ext = any(c and c["extrapolated"] for c in cells)
        v = [c["value"] if c else None for c in cells]
        row = [_size(n), _f(n * s["positives_per_user"]), _f(v[0], 2), _f(v[1]), _f(v[2]), _f(v[3])]
        lines.append("| " + " | ".join(f"*{c}*" if ext else c for c in row) + " |")
    dn = s["measured"]["dropoutnet"]
    lines += [
        "",
        f"- ALS time model: {us['als_iteration_s']['model']} (x = positives)",
        f"- ALS memory model: {us['als_peak_mib']['model']} (x = positives)",
        f"- DropoutNet: {us['dropoutnet_epoch_s']['model']}; measured step "
        + ", ".join(
            f"{p['step_s'] * 1e3:.0f} ms at {_size(p['n_items'])} items ({p['distinct_items_per_step']:.0f} "
            f"distinct items per batch)"
            for p in dn
        ),
        "",
    ]
    if s.get("conclusion"):
        lines += ["### Where one machine stops", "", *s["conclusion"], ""]
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# anime2vec bench ({m['summary']})",
        "",
        f"Started {result['started']}, {result.get('elapsed_s', 0) / 60:.1f} min"
        + (", quick mode" if result.get("quick") else "")
        + f". Load average at start {m.get('loadavg_start', '–')}, at end {result.get('loadavg_end', '–')} "
        f"(a shared {m['cpu_count']}-core machine: absolute times swing; compare the ratios). "
        f"cuda: {m['cuda'] or 'not available'}.",
        "",
    ]
    runs = result.get("part_runs") or {}
    earlier = {p: t for p, t in runs.items() if t != result["started"]}
    if earlier:  # --update: some parts come from an earlier run (machine and load of that run not shown)
        lines += [
            f"Parts kept from earlier runs: {', '.join(f'{p} ({t})' for p, t in earlier.items())}; "
            f"run now: {', '.join(p for p, t in runs.items() if t == result['started'])}.",
            "",
        ]
    if result.get("summary"):
        lines += ["## Summary", "", "| figure | baseline (same run) | result | target | |", "|---|---|---:|---|---|"]
        lines += [
            f"| {r['figure']} | {r['baseline']} | {r['result']} | {r['target']} | {_yes(r['met'])} |"
            for r in result["summary"]
        ]
        lines.append("")
    for key, fn in (
        ("gateway", _md_gateway),
        ("processes", _md_processes),
        ("search", _md_search),
        ("encoder", _md_encoder),
        ("encoder_cuda", _md_encoder_cuda),
        ("training", _md_training),
        ("scale", _md_scale),
    ):
        if result.get(key):
            lines += fn(result[key])
    if result.get("errors"):
        lines += ["## Parts that failed", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()] + [""]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------
def _bar(
    path: Path,
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    title: str,
    log: bool = False,
    target: tuple[float, str] | None = None,
) -> None:
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(labels)), 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    long = max(len(label) for label in labels) > 14
    ax.set_xticks(
        [x + width * (len(series) - 1) / 2 for x in range(len(labels))],
        labels,
        rotation=25 if long else 0,
        ha="right" if long else "center",
    )
    ax.tick_params(axis="x", labelsize=8)
    if target is not None:
        ax.axhline(target[0], color="grey", linestyle="--", linewidth=1, label=target[1])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if len(series) > 1 or target is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve(ax, c: dict, label: str, style: str = "o-") -> None:
    """Measured points solid, extrapolated ones hollow on a dashed continuation."""
    pts = c["points"]
    meas = [p for p in pts if not p["extrapolated"]]
    line = ax.plot([p["size"] for p in meas], [p["value"] for p in meas], style, label=label)[0]
    if any(p["extrapolated"] for p in pts):
        ext = [p for p in pts if p["extrapolated"]]
        join = [meas[-1]] + [p for p in ext if p["size"] > meas[-1]["size"]] if meas else ext
        ax.plot([p["size"] for p in join], [p["value"] for p in join], "--", color=line.get_color())
        ax.plot([p["size"] for p in ext], [p["value"] for p in ext], "o", mfc="none", color=line.get_color())


def _gateway_plot(path: Path, g: dict, device: str) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in [n for n in ("echo", "relay", "ranker", "gateway") if n in g["sweep"]]:
        steps = g["sweep"][name]
        xs = [s["concurrency"] for s in steps]
        a1.plot(
            xs,
            [s["throughput_rps"] for s in steps],
            "o-",
            label={"echo": "echo (baseline)", "relay": "relay → echo (two hops, no work)"}.get(name, name),
        )
        a2.plot(xs, [s.get("p99_ms") for s in steps], "o-", label=f"{name} p99")
        if name == "gateway":
            a2.plot(xs, [s.get("p50_ms") for s in steps], "s--", label="gateway p50")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("requests in flight (closed loop)")
        a.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("requests/s (log)")
    a1.set_title(f"throughput: gateway {g['ratio_gateway_to_echo']:.2f}× echo ({device})", fontsize=10)
    a2.set_yscale("log")
    a2.set_ylabel("latency (ms, log)")
    a2.legend(fontsize=8)
    a2.axhline(g["targets"]["p99_ms_at_half_max"], color="grey", lw=0.8, ls=":", label="p99 target")
    a2.set_title("latency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_loglog(fig, axes, xlabel: str, title: str, path: Path) -> Path:
    """Log-log axes, legends, title; write the figure to path and close it."""
    for a in axes:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(xlabel)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _scale_plots(out_dir: Path, s: dict) -> list[Path]:
    it, us = s["items"], s["users"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _curve(axes[0], it["build_s"], "Qdrant build")
    axes[0].set_ylabel("seconds")
    axes[0].set_title("index build time", fontsize=10)
    raw = {
        "points": [{"size": n, "value": n * s["dim"] * 4 / 2**20, "extrapolated": False} for n in s["items_axis_sizes"]]
    }
    _curve(axes[1], it["resident_mib"], "Qdrant resident")
    _curve(axes[1], it["build_peak_mib"], "build peak", "s-")
    _curve(axes[1], raw, "raw float32 vectors (baseline)", "k^:")
    axes[1].set_ylabel("MiB")
    axes[1].set_title("index memory", fontsize=10)
    _curve(axes[2], it["qdrant_p99_ms"], "Qdrant exact p99")
    _curve(axes[2], it["numpy_p99_ms"], "numpy exact p99 (baseline)", "s-")
    axes[2].axhline(20, color="grey", lw=0.8, ls=":")
    axes[2].set_ylabel("ms")
    axes[2].set_title("favourites query latency", fontsize=10)
    p1 = _save_loglog(
        fig,
        axes,
        "items",
        f"items axis, {s['dim']}-dim vectors (hollow/dashed = extrapolated)",
        out_dir / "scale_items.png",
    )

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _curve(axes[0], us["als_iteration_s"], "ALS iteration (rank 32)")
    axes[0].set_ylabel("seconds")
    axes[0].set_title("ALS time per iteration", fontsize=10)
    _curve(axes[1], us["als_peak_mib"], "ALS peak")
    _curve(axes[1], us["csr_mib"], "CSR matrix (baseline)", "k^:")
    axes[1].axhline(s["machine_memory_gib"] * 1024, color="red", lw=0.8, ls=":", label="this machine's RAM")
    axes[1].set_ylabel("MiB")
    axes[1].set_title("ALS memory", fontsize=10)
    _curve(axes[2], us["dropoutnet_epoch_s"], "DropoutNet epoch")
    axes[2].set_ylabel("seconds")
    axes[2].set_title("DropoutNet time per epoch (from the measured step)", fontsize=10)
    p2 = _save_loglog(
        fig,
        axes,
        "users",
        f"users axis, {s['users_axis_items']:,} items (hollow/dashed = extrapolated)",
        out_dir / "scale_users.png",
    )
    return [p1, p2]


def write_report(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    written[0].write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    written[1].write_text(markdown(result), encoding="utf-8")
    device = result["machine"]["summary"]
    if s := result.get("search"):
        cases = list(s["cases"])
        path = out_dir / "search_latency.png"
        _bar(
            path,
            cases,
            {q: [s["cases"][c][f"{q}_ms"] for c in cases] for q in ("p50", "p99")},
            "latency (ms)",
            f"search, {s['items']:,} items: Qdrant modes vs numpy baseline ({device})",
            target=(s["targets"]["p99_ms"], f"target p99 (served mode, top-{s.get('served_page', 11)})"),
        )
        written.append(path)
    if e := result.get("encoder"):
        path = out_dir / "encoder_throughput.png"
        names = list(e["texts_per_s"])
        _bar(
            path,
            names,
            {"texts/s": [e["texts_per_s"][n] for n in names]},
            "texts/s",
            f"{e['model']}, {e['texts']} catalogue texts: encoder ({e['precision']}) {e['speedup']:.2f}× "
            f"sentence-transformers ({e['device']}, {e['clock']})",
        )
        written.append(path)
    if g := result.get("gateway"):
        path = out_dir / "gateway_load.png"
        _gateway_plot(path, g, device)
        written.append(path)
    if t := result.get("training"):
        path = out_dir / "training_cost.png"
        labels = [f"ALS iteration\nrank {w['factors']}" for w in t["wmf"]] + ["DropoutNet\nepoch"]
        values = [w["iteration_s"] for w in t["wmf"]] + [t["dropoutnet"]["epoch_s"]]
        enc = t["encoding"]
        if enc.get("lookup_s"):
            labels += ["all encodings\nfrom the cache", "all encodings fresh\n(baseline, extrapolated)"]
            values += [enc["lookup_s"], enc["fresh_all_s_extrapolated"]]
        _bar(path, labels, {"seconds": values}, "seconds (log)", f"training cost, full data ({device})", log=True)
        written.append(path)
    if s := result.get("scale"):
        written += _scale_plots(out_dir, s)
    return written

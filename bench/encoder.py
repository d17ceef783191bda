"""Encoder throughput against the library a user would pick instead: `sentence-transformers`
`encode` on the same all-MiniLM-L6-v2 weights and texts (its own batching, batch 32), the baseline of
the target. Beside it: `TextEncoder` as the encoder service runs it (precision "auto": bf16 on a CPU
with native bf16, fp16 on CUDA), `TextEncoder` in fp32, and the textbook transformers eager loop
(batches in input order padded to their longest). Each loop's output is compared with
sentence-transformers' (lowest cosine over the texts). On a CPU the ratios are of process CPU time,
which neighbours' load disturbs far less than wall time; on CUDA, of wall time. Loops run
alternately, best of the rounds.

Texts: a random sample of the default-recipe texts ("Title: … Genres: … Synopsis: …") of the item
universe of the full catalogue (every anime with a synopsis), which is what training and the
encoder service encode; the sample catalogue stands in when the full data is absent.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from anime2vec.features.encoder import TextEncoder, default_model_dir

BATCH = 32
TARGET_SPEEDUP = 1.5  # TextEncoder as served ÷ sentence-transformers
TARGET_MIN_COSINE = 0.999  # ... at this agreement with it
TARGET_CUDA_TEXTS_PER_S = 5000


def catalogue_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """n default-recipe texts of anime with a synopsis, in random order; and where they came from."""
    from anime2vec.data.loader import load_mal
    from anime2vec.data.text import RECIPES, build_texts

    try:
        catalog, source = load_mal().catalog, "full catalogue"
    except Exception:  # no full data here: the sample ships with the repository's data
        catalog, source = load_mal(sample=True).catalog, "sample catalogue"
    has_synopsis = catalog["synopsis"].fillna("").astype(str).str.strip().str.len() > 0
    texts = build_texts(catalog[has_synopsis], RECIPES["default"]).tolist()
    if len(texts) < n:
        raise ValueError(f"{source}: {len(texts)} texts with a synopsis, need {n}")
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [texts[i] for i in order], f"{source}, {len(texts):,} texts with a synopsis, {n} drawn at random"


class PlainLoop:
    """The textbook recipe: tokenize each batch in input order padded to its longest, mean-pool."""

    def __init__(self, device: str, max_length: int):
        model_dir = default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = max_length

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=1).cpu().numpy())
        return np.concatenate(out)


def padding_stats(tokenizer, texts: list[str], max_length: int, batch: int) -> dict:
    """Token lengths, and tokens each loop pushes through the model (real + padding)."""
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])

    def padded(ls: np.ndarray) -> int:
        return int(sum(ls[i : i + batch].max() * len(ls[i : i + batch]) for i in range(0, len(ls), batch)))

    plain, bucketed = padded(lengths), padded(np.sort(lengths)[::-1])
    return {
        "tokens_p10": float(np.percentile(lengths, 10)),
        "tokens_p50": float(np.percentile(lengths, 50)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "truncated_share": float(np.mean(lengths >= max_length)),
        "real_tokens": int(lengths.sum()),
        "plain_padded_tokens": plain,
        "bucketed_padded_tokens": bucketed,
        "padded_tokens_ratio_plain_vs_bucketed": plain / bucketed,
    }


def run_encoder_bench(n_texts: int = 256, rounds: int = 2, compile: bool = False, progress=print) -> dict:
    from sentence_transformers import SentenceTransformer

    texts, source = catalogue_texts(n_texts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = time.process_time if device == "cpu" else time.perf_counter
    encoder = TextEncoder(device=device, batch_size=BATCH, precision="auto")
    fp32 = TextEncoder(device=device, batch_size=BATCH, precision="fp32")
    st = SentenceTransformer(str(default_model_dir()), device=device)
    st.max_seq_length = encoder.max_length
    plain = PlainLoop(encoder.device, encoder.max_length)
    progress(
        f"encoder: {n_texts} texts on {device} ({'cuda available' if device == 'cuda' else 'cuda: not available'}), "
        f"served precision {encoder.precision}, {rounds} round(s) per loop, "
        f"{'CPU' if device == 'cpu' else 'wall'} time"
    )
    loops = {
        "encoder": lambda: encoder.encode(texts),
        "encoder_fp32": lambda: fp32.encode(texts),
        "sentence_transformers": lambda: st.encode(texts, batch_size=BATCH, convert_to_numpy=True),
        "plain": lambda: plain.encode(texts, BATCH),
    }
    compile_s = None
    if compile:
        compiled = TextEncoder(device=device, batch_size=BATCH, compile=True, precision="auto")
        start = time.perf_counter()
        compiled.encode(texts)  # compiles (dynamic shapes) outside the timed rounds
        compile_s = time.perf_counter() - start
        loops["encoder_compiled"] = lambda: compiled.encode(texts)
    # warm-up on a slice (allocator, thread pools); the full-set agreement check comes from the rounds
    encoder.encode(texts[:BATCH])
    fp32.encode(texts[:BATCH])
    plain.encode(texts[:BATCH], BATCH)
    st.encode(texts[:BATCH], batch_size=BATCH)
    times: dict[str, list[float]] = {name: [] for name in loops}
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name, fn in loops.items():
            start = clock()
            vectors[name] = np.asarray(fn(), np.float32)
            times[name].append(clock() - start)
        progress(
            f"encoder: round {r + 1}: " + ", ".join(f"{n} {n_texts / t[-1]:.1f} texts/s" for n, t in times.items())
        )
    # Best of the rounds: the least disturbed measurement of each on a shared machine.
    rate = {name: n_texts / min(ts) for name, ts in times.items()}
    reference = vectors["sentence_transformers"]
    agreement = {
        name: float(np.min(np.sum(v * reference, axis=1)))
        for name, v in vectors.items()
        if name != "sentence_transformers"
    }
    speedup = rate["encoder"] / rate["sentence_transformers"]
    result = {
        "device": encoder.device,
        "cuda": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "model": encoder.name,
        "max_length": encoder.max_length,
        "texts": n_texts,
        "text_source": source,
        "batch_size": BATCH,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "clock": "process CPU time" if device == "cpu" else "wall time",
        "precision": encoder.precision,
        "precision_check": encoder.precision_check,
        "texts_per_s": rate,
        "median_texts_per_s": {n: n_texts / float(np.median(t)) for n, t in times.items()},
        "speedup": speedup,
        "speedup_vs_plain": rate["encoder"] / rate["plain"],
        "speedup_fp32_vs_sentence_transformers": rate["encoder_fp32"] / rate["sentence_transformers"],
        "min_cosine_vs_sentence_transformers": agreement,
        "padding": padding_stats(plain.tokenizer, texts, encoder.max_length, BATCH),
        "compile_s": compile_s,
        "targets": {
            "speedup": TARGET_SPEEDUP,
            "min_cosine": TARGET_MIN_COSINE,
            "speedup_met": speedup >= TARGET_SPEEDUP and agreement["encoder"] >= TARGET_MIN_COSINE,
        },
    }
    if "encoder_compiled" in rate:
        result["speedup_compiled"] = rate["encoder_compiled"] / rate["sentence_transformers"]
    if device == "cuda":
        result["targets"].update(
            cuda_texts_per_s=TARGET_CUDA_TEXTS_PER_S, cuda_met=max(rate.values()) >= TARGET_CUDA_TEXTS_PER_S
        )
    return result

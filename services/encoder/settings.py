"""Encoder service configuration (environment prefix `A2V_ENCODER_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from anime2vec.serving.settings import ServiceSettings


class EncoderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="A2V_ENCODER_")

    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)

    model: Literal["minilm", "tiny-random"] = Field(
        "minilm",
        description="minilm: the bundled all-MiniLM-L6-v2 (or model_dir); tiny-random: a small random BERT for tests",
    )
    model_dir: Path | None = Field(None, description="a transformers model directory instead of the bundled MiniLM")
    device: str | None = Field(None, description="torch device; unset: cuda when available, else cpu")
    max_length: int = Field(256, ge=2, le=512, description="tokens per text; longer texts are truncated")
    encode_batch_size: int = Field(32, ge=1, le=1024, description="texts per forward pass inside one model call")
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steady state)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: fp16 on CUDA; bf16 on a CPU with native bf16 when it agrees with fp32 at start-up "
        "(min cosine 0.999 on probe texts), else fp32 (anime2vec/features/encoder.py)",
    )

    max_batch_texts: int = Field(64, ge=1, le=4096, description="most texts combined into one model call")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="longest a request waits for others to join its batch")
    max_queue_texts: int = Field(2048, ge=1, description="texts that may wait; beyond it RESOURCE_EXHAUSTED")
    max_texts_per_request: int = Field(256, ge=1, description="texts one Encode request may carry")
    max_chars_per_text: int = Field(
        20_000, ge=1, description="characters one text may have (MiniLM reads ~256 tokens, about 1,000 characters)"
    )

    @model_validator(mode="after")
    def _request_fits_queue(self):
        if self.max_texts_per_request > self.max_queue_texts:
            raise ValueError(
                f"max_texts_per_request ({self.max_texts_per_request}) exceeds max_queue_texts "
                f"({self.max_queue_texts}): such a request could never be queued"
            )
        if self.model == "tiny-random" and self.model_dir is not None:
            raise ValueError("model_dir applies to model=minilm only")
        return self

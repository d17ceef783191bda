"""Encoder service: `python -m services.encoder.server` (configuration: services/encoder/settings.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING

import grpc

from anime2vec.serving import errors, heap
from anime2vec.serving.logging import configure_logging
from anime2vec.serving.metrics import Metrics, create_metrics, set_model_info
from anime2vec.serving.server import RunningServer, build_server, handle_stop_signals, time_remaining
from anime2vec.serving.settings import SettingsError
from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc

from .batcher import BatcherClosed, MicroBatcher, QueueFull
from .settings import EncoderSettings

if TYPE_CHECKING:
    from anime2vec.features.encoder import TextEncoder

log = logging.getLogger("anime2vec.encoder")

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
# How long a client refused for a full queue should wait: about one batch's worth of work.
_RETRY_AFTER_S = 0.05


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, encoder: TextEncoder, batcher: MicroBatcher, settings: EncoderSettings):
        self.encoder, self.batcher, self.settings = encoder, batcher, settings

    def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.ServicerContext) -> encoder_pb2.EncodeResponse:
        texts = list(request.texts)
        self._validate(texts)
        try:
            future = self.batcher.submit(texts)
        except QueueFull as e:
            raise errors.resource_exhausted(
                f"encoder queue is full: {e}", reason="ENCODER_QUEUE_FULL", retry_after_s=_RETRY_AFTER_S
            ) from None
        except BatcherClosed:
            raise errors.unavailable("the encoder is shutting down", reason="SHUTTING_DOWN") from None
        # A caller that leaves (cancel, deadline) frees its place in the queue.
        context.add_callback(future.cancel)
        try:
            vectors = future.result(timeout=time_remaining(context))
        except TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while encoding")
        except CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "the caller cancelled")
        return encoder_pb2.EncodeResponse(
            vectors=[encoder_pb2.Vector(values=row) for row in vectors.tolist()],
            model_name=self.encoder.name,
            model_version=self.encoder.fingerprint,
            dim=self.encoder.dim,
        )

    def _validate(self, texts: Sequence[str]) -> None:
        s = self.settings
        if not texts:
            raise errors.invalid_argument({"texts": "at least one text is required"})
        if len(texts) > s.max_texts_per_request:
            raise errors.invalid_argument(
                {"texts": f"{len(texts)} texts; at most {s.max_texts_per_request} per request"}
            )
        problems = {}
        for i, text in enumerate(texts):
            if len(text) > s.max_chars_per_text:
                problems[f"texts[{i}]"] = f"{len(text)} characters; at most {s.max_chars_per_text}"
            elif not text.strip():
                problems[f"texts[{i}]"] = "blank text"
        if problems:
            raise errors.invalid_argument(problems)

    def GetInfo(
        self, request: encoder_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.GetInfoResponse:
        s = self.settings
        return encoder_pb2.GetInfoResponse(
            model_name=self.encoder.name,
            model_version=self.encoder.fingerprint,
            dim=self.encoder.dim,
            device=str(self.encoder.device),
            max_length=self.encoder.max_length,
            max_texts_per_request=s.max_texts_per_request,
            max_chars_per_text=s.max_chars_per_text,
            max_batch_texts=s.max_batch_texts,
            precision=self.encoder.precision,
        )


def load_encoder(settings: EncoderSettings) -> TextEncoder:
    # Imported here so a bad configuration is reported before the slow torch import.
    from anime2vec.features.encoder import TextEncoder

    if settings.model == "tiny-random":
        return TextEncoder.tiny_random(
            device=settings.device, max_length=settings.max_length, precision=settings.precision
        )
    return TextEncoder(
        model_dir=settings.model_dir,
        device=settings.device,
        max_length=settings.max_length,
        batch_size=settings.encode_batch_size,
        compile=settings.compile,
        precision=settings.precision,
    )


def start(settings: EncoderSettings, encoder: TextEncoder, metrics: Metrics | None = None) -> RunningServer:
    """Start serving `encoder`; the caller owns the returned server (wait_for_termination or stop)."""
    metrics = metrics or create_metrics()
    batcher = MicroBatcher(
        encoder.encode,
        max_batch_texts=settings.max_batch_texts,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_texts=settings.max_queue_texts,
        metrics=metrics,
    )
    servicer = EncoderServicer(encoder, batcher, settings)
    try:
        running = build_server(
            settings,
            "encoder",
            lambda server: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            metrics=metrics,
            on_stop=[batcher.close],
        )
    except BaseException:
        batcher.close()
        raise
    set_model_info(metrics, "encoder", version=encoder.fingerprint, encoder=encoder.name, dim=encoder.dim)
    return running


def main() -> int:
    try:
        settings = EncoderSettings.from_env()
    except SettingsError as e:
        print(e, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "encoder")
    handle_stop_signals()  # a stop signal while starting stops it once it serves, gracefully
    try:
        encoder = load_encoder(settings)
    except (OSError, ValueError) as e:
        log.error("cannot load the encoder model: %s", e)
        return 1
    log.info(
        "model loaded",
        extra={
            "model": encoder.name,
            "fingerprint": encoder.fingerprint,
            "dim": encoder.dim,
            "device": str(encoder.device),
            "precision": encoder.precision,
            "precision_check": encoder.precision_check,
        },
    )
    running = start(settings, encoder)
    heap.settle()  # the model loaded: full collections no longer walk it (anime2vec/serving/heap.py)
    running.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Client of the encoder service, shared by the ranker (UpsertAnime) and the gateway (free text).

Encode is idempotent, so transient UNAVAILABLE is retried by gRPC's own retry policy (service
config), always inside the caller's deadline.
"""

from __future__ import annotations

import json

import grpc
import numpy as np

from anime2vec.v1 import encoder_pb2, encoder_pb2_grpc

from .errors import ServiceError, unavailable
from .tls import ClientTLS, open_channel

_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "anime2vec.v1.EncoderService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class EncoderClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 10.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        tls: ClientTLS | None = None,
    ):
        self.address, self.timeout_s = address, timeout_s
        self._channel = open_channel(
            address,
            tls,
            options=[
                ("grpc.service_config", _RETRY_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.max_receive_message_length", max_message_bytes),
                # after an encoder restart, reconnect within ~2 s instead of gRPC's default back-off (up to 2 min)
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)

    def encode(self, texts: list[str], timeout_s: float | None = None) -> tuple[np.ndarray, str]:
        """(n, dim) float32 vectors and the encoder's model_version (fingerprint).
        Raises ServiceError: UNAVAILABLE when the encoder cannot be reached in time, or the
        encoder's own status (e.g. INVALID_ARGUMENT for a text that is too long)."""
        try:
            resp = self._stub.Encode(encoder_pb2.EncodeRequest(texts=texts), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise unavailable(
                    f"encoder at {self.address} unavailable ({e.code().name})",
                    reason="ENCODER_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from None
            raise ServiceError.from_rpc_error(e) from None
        vecs = np.asarray([v.values for v in resp.vectors], dtype=np.float32).reshape(len(resp.vectors), resp.dim)
        return vecs, resp.model_version

    def close(self) -> None:
        self._channel.close()

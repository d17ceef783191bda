"""Calls from the gateway to the ranker: one channel with gRPC's own retry policy for the idempotent
methods, a deadline on every call (the configured one, never past the caller's), and failures
mapped to what the gateway's caller can act on, with the ranker's field names rewritten to the
gateway request's ("liked_ids[2]" → "favourites[3].anime_id"). Several ranker processes (a list of
addresses, `make run`) share the one channel: gRPC's round_robin policy sends each call to the next
ready one, and a retry after UNAVAILABLE to another."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2

from anime2vec.serving.errors import ServiceError, resource_exhausted, unavailable
from anime2vec.serving.server import time_remaining
from anime2vec.serving.tls import ClientTLS, open_channel
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc

from .settings import balanced_target

log = logging.getLogger("services.gateway")

RANKER_SERVICE = "anime2vec.v1.RankerService"
# Safe to send twice: reads, and RecordFeedback (idempotent by event id). UpsertAnime is not
# (without an id, a retry would add a second anime).
IDEMPOTENT_METHODS = (
    "RecommendFromFavourites",
    "RecommendForUser",
    "SimilarItems",
    "RecommendFromVector",
    "GetModelInfo",
    "ListCatalog",
    "RecordFeedback",
)
_RETRY_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": RANKER_SERVICE, "method": m} for m in IDEMPOTENT_METHODS],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
RETRY_SERVICE_CONFIG = json.dumps(_RETRY_CONFIG)
# Several ranker processes: every call to the next ready one (one address keeps gRPC's default, pick_first).
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], **_RETRY_CONFIG})


def _channel_options(balanced: bool) -> list[tuple[str, object]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG if balanced else RETRY_SERVICE_CONFIG),
        # Reconnect quickly after a ranker restart instead of gRPC's default backoff of up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


# Leave this much of the caller's deadline for the gateway's own work after the downstream answer.
_MARGIN_S = 0.05
# The ranker replaces a catalogue anime only when the call names it in this metadata
# (services/ranker/catalogue_writes.py REPLACE_CATALOGUE_KEY): the gateway sends it for callers whose key has
# the `catalog` scope, the only ones whose AddAnime reaches the ranker.
REPLACE_CATALOGUE_KEY = "a2v-replace-catalogue-anime"
# What grpc answers (RESOURCE_EXHAUSTED, no details) when a server's maximum_concurrent_rpcs sheds a call.
_CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded"


def deadline(context: grpc.ServicerContext | None, configured_s: float) -> float:
    """Timeout for one downstream call: `configured_s`, shortened to the caller's remaining time.
    DEADLINE_EXCEEDED at once when the caller has no time left to wait."""
    remaining = time_remaining(context) if context is not None else None
    if remaining is None:
        return configured_s
    if remaining <= _MARGIN_S:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the ranker was called")
    return min(configured_s, remaining - _MARGIN_S)


# Statuses that describe the ranker's own trouble (or the encoder's behind it) rather than the
# caller's request: their text may name internal hosts and ports, so callers get the gateway's words
# (the ErrorInfo reason and RetryInfo are kept) and only the log gets the original.
_OWN_TROUBLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
_ERROR_ID = re.compile(r"\(id [0-9a-f]{12}\)")  # the ranker's INTERNAL answers carry one: it matches its log


def _in_own_words(error: ServiceError, address: str) -> ServiceError:
    reason = next((d.reason for d in error.details if isinstance(d, error_details_pb2.ErrorInfo)), "")
    log.warning(
        "ranker answered %s (%s): %s", error.code.name, reason or "no reason", error.message, extra={"ranker": address}
    )
    if reason == "ENCODER_UNAVAILABLE":
        message = "the encoder is unavailable (the ranker needs it for this call); retry shortly"
    elif error.code == grpc.StatusCode.INTERNAL:
        error_id = _ERROR_ID.search(error.message)
        message = "the ranker failed" + (f" {error_id.group(0)}" if error_id else "")
    else:
        message = f"the ranker could not serve this call ({error.code.name})"
    return ServiceError(error.code, message, error.details)


class Ranker:
    def __init__(self, address: str, timeout_s: float, max_message_bytes: int, tls: ClientTLS | None = None):
        """address: host:port, or a comma-separated list of IP:port (settings.balanced_target), round robin."""
        self.address, self.timeout_s = address, timeout_s
        balanced = balanced_target(address)
        self._channel = open_channel(
            balanced or address,
            tls,
            options=[*_channel_options(balanced is not None), ("grpc.max_receive_message_length", max_message_bytes)],
        )
        self.stub = ranker_pb2_grpc.RankerServiceStub(self._channel)

    # One typed method per ranker RPC the gateway uses: `context` is the gateway caller's (its deadline
    # bounds the call), `fields` maps the ranker's request field paths to the caller's.
    def recommend_from_favourites(
        self,
        request: ranker_pb2.RecommendFromFavouritesRequest,
        context=None,
        *,
        fields: Mapping[str, str] | None = None,
    ) -> ranker_pb2.RankedList:
        return self._call(self.stub.RecommendFromFavourites, request, context, fields=fields)

    def recommend_for_user(self, request: common_pb2.RecommendForUserRequest, context=None) -> ranker_pb2.RankedList:
        return self._call(self.stub.RecommendForUser, request, context)

    def similar_items(
        self, request: ranker_pb2.SimilarItemsRequest, context=None, *, fields: Mapping[str, str] | None = None
    ) -> ranker_pb2.RankedList:
        return self._call(self.stub.SimilarItems, request, context, fields=fields)

    def recommend_from_vector(
        self, request: ranker_pb2.RecommendFromVectorRequest, context=None, *, fields: Mapping[str, str] | None = None
    ) -> ranker_pb2.RankedList:
        return self._call(self.stub.RecommendFromVector, request, context, fields=fields)

    def upsert_anime(
        self,
        request: ranker_pb2.UpsertAnimeRequest,
        context=None,
        *,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> ranker_pb2.UpsertAnimeResponse:
        return self._call(self.stub.UpsertAnime, request, context, timeout_s=timeout_s, metadata=metadata)

    def record_feedback(
        self,
        request: ranker_pb2.FeedbackBatch,
        context=None,
        *,
        timeout_s: float,
        fields: Mapping[str, str] | None = None,
    ) -> ranker_pb2.FeedbackResult:
        return self._call(self.stub.RecordFeedback, request, context, timeout_s=timeout_s, fields=fields)

    def get_model_info(
        self, request: common_pb2.GetModelInfoRequest | None = None, context=None
    ) -> common_pb2.GetModelInfoResponse:
        return self._call(self.stub.GetModelInfo, request or common_pb2.GetModelInfoRequest(), context)

    def list_catalog(
        self, request: ranker_pb2.ListCatalogRequest, *, timeout_s: float
    ) -> ranker_pb2.ListCatalogResponse:
        return self._call(self.stub.ListCatalog, request, None, timeout_s=timeout_s)

    def _call(
        self,
        rpc,
        request,
        context: grpc.ServicerContext | None = None,
        *,
        timeout_s: float | None = None,
        fields: Mapping[str, str] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        """rpc(request) with a bounded deadline; ServiceError on failure. Messages never name the
        ranker's address (it is logged instead)."""
        timeout = deadline(context, timeout_s or self.timeout_s)
        # Fields this gateway does not know (a caller may pad a message with megabytes of them) are
        # not passed on: what the ranker gets is what the gateway validated.
        request.DiscardUnknownFields()
        try:
            return rpc(request, timeout=timeout, metadata=metadata or None)
        except grpc.RpcError as e:
            code, error = e.code(), ServiceError.from_rpc_error(e)
            answered = any(isinstance(d, error_details_pb2.ErrorInfo) for d in error.details)
            if code == grpc.StatusCode.UNAVAILABLE and not answered:  # unreachable, not the ranker's own answer
                log.warning("ranker unreachable: %s", e.details(), extra={"ranker": self.address})
                raise unavailable(
                    "the ranker is unavailable; retry shortly", reason="RANKER_UNAVAILABLE", retry_after_s=1.0
                ) from None
            shed = code == grpc.StatusCode.RESOURCE_EXHAUSTED and _CONCURRENCY_LIMIT in (e.details() or "")
            if shed and not answered:  # the ranker shed it; not retried here (that would only add load)
                raise resource_exhausted(
                    "the ranker is at its concurrency limit; retry shortly",
                    reason="RANKER_OVERLOADED",
                    retry_after_s=1.0,
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                remaining = time_remaining(context) if context is not None else None
                if remaining is not None and remaining <= _MARGIN_S:
                    raise ServiceError(code, "the deadline passed while waiting for the ranker") from None
                raise unavailable(
                    f"the ranker did not answer within {timeout:.1f} s", reason="RANKER_UNAVAILABLE", retry_after_s=1.0
                ) from None
            if code in _OWN_TROUBLE:
                raise _in_own_words(error, self.address) from None
            raise error.renamed(fields or {}) from None

    def close(self) -> None:
        self._channel.close()

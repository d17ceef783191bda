"""API-key authentication as a server interceptor.

Every RPC except the standard health and reflection services must carry the metadata
`authorization: Bearer <key>`. Missing or malformed → UNAUTHENTICATED; a key that is not configured
→ PERMISSION_DENIED. Keys are compared as SHA-256 digests with `hmac.compare_digest` against every
configured key (no early exit), so timing reveals neither a key's length nor how much of it matched.
Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc
from google.rpc import error_details_pb2

from anime2vec.serving.errors import DOMAIN, ServiceError

from .settings import GatewaySettings

# Methods anyone may call: probes and tooling (grpcurl) need no key.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
_SCHEME = "bearer"


def load_api_keys(settings: GatewaySettings) -> list[str]:
    """The configured keys: the comma list plus the file's non-comment lines. ValueError if none."""
    keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
    if settings.api_keys_file is not None:
        keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines()
                 if not line.lstrip().startswith("#")]
    keys = [k for k in keys if k]
    if not keys:
        raise ValueError("no API keys configured (A2V_GATEWAY_API_KEYS / A2V_GATEWAY_API_KEYS_FILE hold none)")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _denied(code: grpc.StatusCode, message: str, reason: str) -> grpc.RpcMethodHandler:
    error = ServiceError(code, message, [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)])

    def deny(request, context):
        raise error
    return grpc.unary_unary_rpc_method_handler(deny)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyInterceptor needs at least one key")

    def is_allowed(self, key: str) -> bool:
        presented = _digest(key)
        allowed = False
        for digest in self._digests:   # every key is compared, whatever matched before
            allowed |= hmac.compare_digest(presented, digest)
        return allowed

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(PUBLIC_PREFIXES):
            return continuation(handler_call_details)
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if not values:
            return _denied(grpc.StatusCode.UNAUTHENTICATED,
                           "missing API key: send the metadata 'authorization: Bearer <key>'", "API_KEY_MISSING")
        scheme, _, key = (values[0] if isinstance(values[0], str) else "").strip().partition(" ")
        key = key.strip()
        if len(values) > 1 or scheme.lower() != _SCHEME or not key:
            return _denied(grpc.StatusCode.UNAUTHENTICATED,
                           "malformed authorization metadata: expected exactly one 'Bearer <key>'",
                           "API_KEY_MALFORMED")
        if not self.is_allowed(key):
            return _denied(grpc.StatusCode.PERMISSION_DENIED, "API key not recognised", "API_KEY_INVALID")
        return continuation(handler_call_details)

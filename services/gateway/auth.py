"""API keys with scopes, checked by a server interceptor before a call takes any resource.

Every RPC except the standard health and reflection services must carry the metadata
`authorization: Bearer <key>`. Missing or malformed → UNAUTHENTICATED; a key that is not configured
→ PERMISSION_DENIED (API_KEY_INVALID); a key without the scope the method needs → PERMISSION_DENIED
(API_KEY_SCOPE, ErrorInfo metadata `method` and `required_scope`). Refusals are answered at once,
without reading the request (`Refusal`): a caller without a key cannot hold a concurrency slot.

Keys are configured as `<key>` or `<key>:<scope>+<scope>...`; a bare key may read and record
feedback (`DEFAULT_SCOPES`), writing the catalogue takes `catalog`. Keys are compared as SHA-256
digests with `hmac.compare_digest` against every configured key (no early exit), so timing reveals
neither a key's length nor how much of it matched. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2

from anime2vec.serving.errors import DOMAIN, ServiceError
from anime2vec.serving.server import Refusal

from .settings import GatewaySettings

# Methods anyone may call: probes and tooling (grpcurl) need no key.
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_SCHEME = "bearer"
_GATEWAY = "/anime2vec.v1.GatewayService/"

# What each scope allows. A gateway method missing here is refused to every key (fail closed);
# tests/gateway checks that every method of GatewayService has its scope.
SCOPES = ("read", "feedback", "catalog")
METHOD_SCOPES = {
    **{
        f"{_GATEWAY}{m}": "read"
        for m in (
            "Recommend",
            "RecommendForUser",
            "Similar",
            "SearchText",
            "ImportMalList",
            "ResolveTitles",
            "GetModelInfo",
        )
    },
    f"{_GATEWAY}RecordFeedback": "feedback",
    f"{_GATEWAY}AddAnime": "catalog",  # adds or overwrites an anime's title and text
}
DEFAULT_SCOPES = frozenset({"read", "feedback"})  # a key configured without scopes


@dataclass(frozen=True)
class ApiKey:
    key: str
    scopes: frozenset[str]


def parse_key(entry: str, where: str) -> ApiKey:
    """`<key>` or `<key>:<scope>+<scope>...`; ValueError naming `where` (never the key) otherwise."""
    key, sep, scope_text = entry.partition(":")
    key = key.strip()
    if not key:
        raise ValueError(f"{where}: an entry has no key before ':'")
    if not sep:
        return ApiKey(key, DEFAULT_SCOPES)
    scopes = frozenset(s.strip() for s in scope_text.split("+"))
    unknown = sorted(s for s in scopes if s not in SCOPES)
    if unknown or not scopes:
        raise ValueError(
            f"{where}: unknown scope(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"scopes are {', '.join(SCOPES)} joined with '+', e.g. <key>:read+feedback"
        )
    return ApiKey(key, scopes)


def load_api_keys(settings: GatewaySettings) -> list[ApiKey]:
    """The configured keys: the comma list plus the file's non-comment lines. ValueError if none, if
    a scope is unknown, or if one key is configured twice with different scopes."""
    entries = [(e.strip(), "A2V_GATEWAY_API_KEYS") for e in settings.api_keys.get_secret_value().split(",")]
    if settings.api_keys_file is not None:
        entries += [
            (line.strip(), f"A2V_GATEWAY_API_KEYS_FILE line {i}")
            for i, line in enumerate(Path(settings.api_keys_file).read_text().splitlines(), 1)
            if not line.lstrip().startswith("#")
        ]
    keys: dict[str, ApiKey] = {}
    for entry, where in entries:
        if not entry:
            continue
        parsed = parse_key(entry, where)
        if parsed.key in keys and keys[parsed.key].scopes != parsed.scopes:
            raise ValueError(f"{where}: a key configured earlier is given different scopes")
        keys[parsed.key] = parsed
    if not keys:
        raise ValueError("no API keys configured (A2V_GATEWAY_API_KEYS / A2V_GATEWAY_API_KEYS_FILE hold none)")
    return list(keys.values())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _denied(code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str] | None = None) -> Refusal:
    return Refusal(
        ServiceError(
            code, message, [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))]
        )
    )


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: Iterable[ApiKey | str]):
        parsed = [k if isinstance(k, ApiKey) else ApiKey(k, DEFAULT_SCOPES) for k in keys]
        self._keys = [(_digest(k.key), k.scopes) for k in parsed]
        if not self._keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")

    def scopes_of(self, key: str) -> frozenset[str] | None:
        """The scopes of a configured key; None for a key that is not configured."""
        presented = _digest(key)
        found = None
        for digest, scopes in self._keys:  # every key is compared, whatever matched before
            if hmac.compare_digest(presented, digest):
                found = scopes
        return found

    def is_allowed(self, key: str) -> bool:
        return self.scopes_of(key) is not None

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(PUBLIC_PREFIXES):
            return continuation(handler_call_details)
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if not values:
            return _denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send the metadata 'authorization: Bearer <key>'",
                "API_KEY_MISSING",
            )
        scheme, _, key = (values[0] if isinstance(values[0], str) else "").strip().partition(" ")
        key = key.strip()
        if len(values) > 1 or scheme.lower() != _SCHEME or not key:
            return _denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed authorization metadata: expected exactly one 'Bearer <key>'",
                "API_KEY_MALFORMED",
            )
        scopes = self.scopes_of(key)
        if scopes is None:
            return _denied(grpc.StatusCode.PERMISSION_DENIED, "API key not recognised", "API_KEY_INVALID")
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED
            return None
        needed = METHOD_SCOPES.get(method)
        if needed not in scopes:
            name = method.rsplit("/", 1)[-1][:100]
            return _denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this API key may not call {name}: it needs the scope {needed!r}"
                if needed
                else f"no API key may call {name}",
                "API_KEY_SCOPE",
                {"method": name, "required_scope": needed or ""},
            )
        return handler

"""Expected RPC failures with google.rpc rich details (grpcio-status), both directions.

Server side, a handler (or anything it calls) raises a `ServiceError` built by one of the
constructors below; the server interceptor aborts the RPC with its status, so handlers never juggle
`context`. Client side, `ErrorDetails.from_rpc_error` reads the details back.

Conventions (documented in common.proto): INVALID_ARGUMENT carries google.rpc.BadRequest with the
field path; NOT_FOUND carries ResourceInfo and ErrorInfo whose metadata "suggestions" is a JSON
array; RESOURCE_EXHAUSTED and UNAVAILABLE carry ErrorInfo and, when known, RetryInfo. A field path
is only ever in a violation's `field`; the message of an error about fields is composed from its
violations ("path: description; ..."), so a relay can rename the paths (`renamed`) without reading text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "anime2vec.v1"
SUGGESTIONS_KEY = "suggestions"
# The google.rpc detail types these services send.
_DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
)


class ServiceError(Exception):
    """A failure to report to the caller as `code` with `message` and rich `details`."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()):
        if code == grpc.StatusCode.OK:
            raise ValueError("a ServiceError cannot have status OK")
        super().__init__(message)
        self.code, self.message, self.details = code, message, tuple(details)

    def to_status(self) -> grpc.Status:
        # Errors quote the caller's input; clients refuse trailers past ~8 KiB and would see
        # RESOURCE_EXHAUSTED instead of this status, so the size is bounded here, for every caller.
        # Bounded in bytes as they travel, not characters: grpc-message is percent-encoded (a
        # non-ASCII character costs up to 12 bytes) and the details go base64-encoded (4/3).
        message = _clip_wire(_clip(self.message, MAX_MESSAGE_CHARS), MAX_MESSAGE_WIRE_BYTES)
        limit = MAX_DETAIL_CHARS
        while True:
            status = status_pb2.Status(code=self.code.value[0], message=message)
            for d in self.details:
                packed = any_pb2.Any()
                packed.Pack(_bounded(d, limit))
                status.details.append(packed)
            if len(status.SerializeToString()) * 4 // 3 <= MAX_DETAILS_WIRE_BYTES or limit <= 8:
                return rpc_status.to_status(status)
            limit //= 2

    def renamed(self, fields: Mapping[str, str]) -> "ServiceError":
        """The same error for a caller whose request names these fields differently (a gateway
        relaying the ranker's answer): each violation's path is looked up whole in `fields` (kept when
        absent), and a message composed from the violations is composed again from the renamed ones.
        Nothing is searched in text: a message that is not such a composition is kept as it is."""
        if not fields:
            return self
        old = [v for d in self.details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations]
        if not old:
            return self
        details = [
            _bad_request((fields.get(v.field, v.field), v.description) for v in d.field_violations)
            if isinstance(d, error_details_pb2.BadRequest)
            else d
            for d in self.details
        ]
        message = self.message
        if message == _compose((v.field, v.description) for v in old):
            message = _compose((fields.get(v.field, v.field), v.description) for v in old)
        return ServiceError(self.code, message, details)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "ServiceError":
        """Re-raise a downstream service's error to our own caller with its code and details
        (e.g. the gateway passing on the ranker's INVALID_ARGUMENT)."""
        status = rpc_status.from_call(err)
        details = []
        for packed in status.details if status is not None else ():
            for cls_ in _DETAIL_TYPES:
                if packed.Is(cls_.DESCRIPTOR):
                    msg = cls_()
                    packed.Unpack(msg)
                    details.append(msg)
        return cls(err.code(), err.details() or "", details)


MAX_MESSAGE_CHARS = 512
MAX_VIOLATIONS = 10
MAX_DETAIL_CHARS = 200
# what the two trailers may take on the wire, well inside the ~8 KiB clients accept in all
MAX_MESSAGE_WIRE_BYTES = 1500
MAX_DETAILS_WIRE_BYTES = 4000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wire_len(ch: str) -> int:
    """Bytes one character takes in grpc-message (printable ASCII but '%' travels as is)."""
    return 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "surrogatepass"))


def _clip_wire(text: str, budget: int) -> str:
    total = 0
    for i, ch in enumerate(text):
        total += _wire_len(ch)
        if total > budget - 9:  # room for the ellipsis, percent-encoded
            return text[:i] + "…"
    return text


def _bounded(d: Message, MAX_DETAIL_CHARS: int = MAX_DETAIL_CHARS) -> Message:
    """A copy of one detail message whose caller-derived text fits the trailer budget."""
    out = type(d)()
    out.CopyFrom(d)
    if isinstance(out, error_details_pb2.BadRequest):
        kept = [(v.field, v.description) for v in out.field_violations]
        extra = len(kept) - MAX_VIOLATIONS
        del out.field_violations[:]
        for f, desc in kept[:MAX_VIOLATIONS]:
            out.field_violations.add(field=_clip(f, MAX_DETAIL_CHARS), description=_clip(desc, MAX_DETAIL_CHARS))
        if extra > 0:
            out.field_violations.add(field="…", description=f"and {extra} more problems of the same request")
    elif isinstance(out, error_details_pb2.ResourceInfo):
        out.resource_name = _clip(out.resource_name, MAX_DETAIL_CHARS)
        out.description = _clip(out.description, MAX_MESSAGE_CHARS)
    elif isinstance(out, error_details_pb2.ErrorInfo):
        for k in list(out.metadata):
            out.metadata[k] = _clip(out.metadata[k], 4 * MAX_DETAIL_CHARS)
    return out


def _error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _compose(violations: Iterable[tuple[str, str]]) -> str:
    """The message of an error about request fields: each path with what is wrong there."""
    return "; ".join(f"{f}: {d}" for f, d in violations)


def _bad_request(violations: Iterable[tuple[str, str]]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )


def invalid_argument(
    violations: Mapping[str, str] | Iterable[tuple[str, str]], message: str | None = None
) -> ServiceError:
    """One violation per bad field, keyed by its path in the request ("texts[3]", "options.limit")."""
    pairs = list(violations.items() if isinstance(violations, Mapping) else violations)
    if not pairs:
        raise ValueError("invalid_argument needs at least one field violation")
    message = message or _compose(pairs)
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, [_bad_request(pairs)])


def not_found(
    resource_type: str,
    resource_name: str,
    *,
    reason: str = "NOT_FOUND",
    suggestions: Sequence[str] = (),
    field: str | None = None,
) -> ServiceError:
    """`resource_type` `resource_name` does not exist; `suggestions` are close matches to offer
    (in the message and in ErrorInfo metadata), `field` the request field that named it."""
    what = f"{resource_type} {resource_name!r} not found"
    if suggestions:
        what += "; did you mean: " + ", ".join(repr(s) for s in suggestions) + "?"
    details: list[Message] = [
        error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=resource_name, description=what),
        _error_info(
            reason, {SUGGESTIONS_KEY: json.dumps(list(suggestions), ensure_ascii=False)} if suggestions else None
        ),
    ]
    if field:
        details.append(_bad_request([(field, what)]))
    return ServiceError(grpc.StatusCode.NOT_FOUND, _compose([(field, what)]) if field else what, details)


def already_exists(message: str, *, reason: str, field: str | None = None) -> ServiceError:
    """A caller-chosen identifier is taken by something different (e.g. an event id reused)."""
    details: list[Message] = [_error_info(reason)]
    if field:
        details.append(_bad_request([(field, message)]))
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, details)


def resource_exhausted(message: str, *, reason: str, retry_after_s: float | None = None) -> ServiceError:
    return _with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason, retry_after_s)


def unavailable(message: str, *, reason: str, retry_after_s: float | None = None) -> ServiceError:
    return _with_reason(grpc.StatusCode.UNAVAILABLE, message, reason, retry_after_s)


def failed_precondition(message: str, *, reason: str) -> ServiceError:
    return _with_reason(grpc.StatusCode.FAILED_PRECONDITION, message, reason, None)


def _with_reason(code: grpc.StatusCode, message: str, reason: str, retry_after_s: float | None) -> ServiceError:
    details: list[Message] = [_error_info(reason)]
    if retry_after_s is not None:
        details.append(_retry_info(retry_after_s))
    return ServiceError(code, message, details)


@dataclass(frozen=True)
class ErrorDetails:
    """What a client can act on from a failed call. Fields are empty when the status had none."""

    code: grpc.StatusCode
    message: str
    field_violations: dict[str, str] = field(default_factory=dict)  # field path → description
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    resource_type: str = ""
    resource_name: str = ""
    retry_after_s: float | None = None

    @property
    def suggestions(self) -> list[str]:
        return json.loads(self.metadata.get(SUGGESTIONS_KEY, "[]"))

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "ErrorDetails":
        out: dict = {"code": err.code(), "message": err.details() or ""}
        status = rpc_status.from_call(err)
        for packed in status.details if status is not None else ():
            if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                packed.Unpack(br)
                out["field_violations"] = {v.field: v.description for v in br.field_violations}
            elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                ei = error_details_pb2.ErrorInfo()
                packed.Unpack(ei)
                out.update(reason=ei.reason, domain=ei.domain, metadata=dict(ei.metadata))
            elif packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                ri = error_details_pb2.ResourceInfo()
                packed.Unpack(ri)
                out.update(resource_type=ri.resource_type, resource_name=ri.resource_name)
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                packed.Unpack(ri)
                out["retry_after_s"] = ri.retry_delay.ToNanoseconds() / 1e9
        return cls(**out)

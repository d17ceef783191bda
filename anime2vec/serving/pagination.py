"""Opaque page tokens bound to the request they continue.

A token carries the offset of the next page and a digest of the request without its page token
(plus whatever else must not change between pages, such as the model version). Sending a token with
a different request is the caller's error and gets INVALID_ARGUMENT instead of a silently shifted
page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from google.protobuf.message import Message

from .errors import invalid_argument

_DIGEST_CHARS = 16


def request_digest(request: Message, *extra: str) -> str:
    """Digest of `request` with `options.page_token`, `.limit` and `.explain` cleared, and of `extra` (e.g. model version)."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "options" in copy.DESCRIPTOR.fields_by_name and copy.HasField("options"):
        # a token continues the same ranking: page size and explanations may change between pages
        for name in ("page_token", "limit", "explain"):
            copy.options.ClearField(name)
    h = hashlib.sha256(copy.SerializeToString(deterministic=True))
    for part in extra:
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:_DIGEST_CHARS]


def encode_page_token(offset: int, digest: str) -> str:
    # json.dumps({"o": offset, "d": digest}, separators=(",", ":")) for an int and a hex digest,
    # written out (every page of every request issues one; dumps cost a tenth of a request's handler)
    if not (isinstance(offset, int) and digest.isalnum() and digest.isascii()):
        raise ValueError("a page token is an int offset and a hex digest")
    raw = f'{{"o":{offset},"d":"{digest}"}}'.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, digest: str, field: str = "options.page_token") -> int:
    """The offset a token points at (0 for an empty token); INVALID_ARGUMENT naming `field` when
    the token is garbled or belongs to another request."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset, token_digest = data["o"], data["d"]
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or not isinstance(token_digest, str):
            raise ValueError
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise invalid_argument({field: "not a page token issued by this service"}) from None
    if token_digest != digest:
        raise invalid_argument(
            {field: "page token belongs to a different request or model version; start again without a token"}
        )
    return offset

"""Checks of one FeedbackEvent's fields that the gateway and the ranker share (the gateway names
problems in its caller's terms before resolving titles; the ranker checks again for any caller)."""

from __future__ import annotations

import time

from anime2vec.feedback import KINDS, MAX_EVENT_ID_LENGTH
from anime2vec.v1 import common_pb2 as S

FEEDBACK_KINDS = {
    S.FEEDBACK_KIND_RATED: "rated",
    S.FEEDBACK_KIND_COMPLETED: "completed",
    S.FEEDBACK_KIND_DROPPED: "dropped",
    S.FEEDBACK_KIND_ADDED: "added",
    S.FEEDBACK_KIND_REMOVED: "removed",
}
assert set(FEEDBACK_KINDS.values()) == set(KINDS)
MAX_FUTURE_S = 86400.0  # occurred_at may run ahead of our clock by a day (client clocks), no more


def feedback_problems(e, kind: str | None) -> list[tuple[str, str]]:
    """(field, problem) for an event's fields other than the anime; `kind` is
    FEEDBACK_KINDS.get(e.kind) (None: unspecified or unknown)."""
    out = []
    if not e.event_id:
        out.append(("event_id", "required: a client-chosen unique id (e.g. a UUID)"))
    elif len(e.event_id) > MAX_EVENT_ID_LENGTH:
        out.append(("event_id", f"at most {MAX_EVENT_ID_LENGTH} characters, got {len(e.event_id)}"))
    if e.user_id <= 0:
        out.append(("user_id", f"must be > 0, got {e.user_id}"))
    if kind is None:
        out.append(("kind", "required: one of " + ", ".join(S.FeedbackKind.Name(k) for k in FEEDBACK_KINDS)))
    if not 0 <= e.score <= 10:
        out.append(("score", f"must be 1..10, or 0 for none; got {e.score}"))
    elif kind == "rated" and e.score == 0:
        out.append(("score", "required (1..10) for FEEDBACK_KIND_RATED"))
    elif kind in ("added", "removed") and e.score:
        out.append(("score", f"not allowed for FEEDBACK_KIND_{kind.upper()}"))
    if e.HasField("occurred_at"):
        t = e.occurred_at
        if not (0 <= t.nanos < 1_000_000_000 and 0 < t.seconds <= time.time() + MAX_FUTURE_S):
            out.append(("occurred_at", "must be a valid time after 1970 and at most a day in the future"))
    return out


def occurred_at_seconds(e) -> float | None:
    return e.occurred_at.seconds + e.occurred_at.nanos / 1e9 if e.HasField("occurred_at") else None

"""Request limits, defined once: the ranker enforces them (its settings default to these), reports the
values it runs with in GetModelInfoResponse.limits, and the gateway checks callers' requests against the
values it last learnt from the ranker (these defaults until it has asked)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from anime2vec.v1 import common_pb2


@dataclass(frozen=True)
class RequestLimits:
    max_limit: int = 100  # RecommendOptions.limit (the page size)
    default_limit: int = 10  # ... when the request leaves it 0
    max_ids: int = 500  # liked / disliked / excluded ids per request
    max_feedback_events: int = 1000  # events per RecordFeedback call

    def to_proto(self) -> common_pb2.RequestLimits:
        return common_pb2.RequestLimits(
            max_limit=self.max_limit,
            default_limit=self.default_limit,
            max_ids=self.max_ids,
            max_feedback_events=self.max_feedback_events,
        )

    @classmethod
    def from_proto(cls, p: common_pb2.RequestLimits) -> RequestLimits:
        """The limits a ranker reported; a field it left 0 (an older ranker) keeps the default."""
        got = {f: getattr(p, f) for f in ("max_limit", "default_limit", "max_ids", "max_feedback_events")}
        return replace(cls(), **{f: v for f, v in got.items() if v > 0})


DEFAULTS = RequestLimits()


class LearntLimits:
    """What the gateway knows of the ranker's limits: DEFAULTS until a GetModelInfo answer says otherwise."""

    def __init__(self) -> None:
        self._limits = DEFAULTS

    @property
    def current(self) -> RequestLimits:
        return self._limits

    def learn(self, response: common_pb2.GetModelInfoResponse) -> common_pb2.GetModelInfoResponse:
        if response.HasField("limits"):
            self._limits = RequestLimits.from_proto(response.limits)  # one reference swap: readers see old or new
        return response

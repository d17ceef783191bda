"""RankerService: the handlers. Each checks what its request kind needs (ids known, weights, the
content vector) and says what it contributes to a page (`retrieval.Query`); `retrieval.Retriever`
does the rest the same way for every kind (page, strategy chain over Qdrant or in memory, re-rank,
response). Which version serves and its swap: lifecycle.py; UpsertAnime: catalogue_writes.py; the
served state and what requests read from it: state.py; users updated by feedback: online_users.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from anime2vec.feedback import FeedbackConflict, FeedbackEvent, FeedbackStore
from anime2vec.index.base import IndexUnavailable, ItemIndex
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.errors import already_exists, failed_precondition, invalid_argument, not_found, unavailable
from anime2vec.serving.feedback_input import FEEDBACK_KINDS, feedback_problems, occurred_at_seconds
from anime2vec.serving.metrics import Metrics
from anime2vec.serving.pagination import decode_page_token, encode_page_token, request_digest
from anime2vec.serving_model.users import wmf_scores
from anime2vec.store.added_anime import AnyAddedAnimeStore
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc

from .catalogue_writes import MAX_SYNOPSIS, CatalogueWriter
from .lifecycle import Lifecycle
from .online_users import OnlineUsers
from .retrieval import Query, Retriever, wmf_refusal
from .settings import RankerSettings
from .state import Serving, anchor_of, content_of, model_info, next_model_status

if TYPE_CHECKING:
    from anime2vec.store.feedback_postgres import AnyFeedbackStore

log = logging.getLogger(__name__)
S = common_pb2
# liked_weights are confidences, 0.5-5 in training: huge ones make the ALS fold-in ill-conditioned,
# and below ~1e-3 the fold-in and the weighted means vanish, so every score is 0
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0
# content vectors come from the encoder, L2-normalised (norm 1); far from it they were not, and a
# vector near 0 or near float32's limits ranks nothing meaningful (every score 0, or not finite)
MIN_VECTOR_NORM, MAX_VECTOR_NORM = 0.5, 2.0


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(
        self,
        settings: RankerSettings,
        index: ItemIndex,
        store: AnyAddedAnimeStore,
        metrics: Metrics,
        encoder: EncoderClient | None = None,
        feedback: AnyFeedbackStore | None = None,
    ):
        self.settings, self.index, self.store, self.metrics = settings, index, store, metrics
        self.feedback = feedback or FeedbackStore(settings.sqlite_dir / "feedback.sqlite")
        self.users = OnlineUsers(self.feedback, index, metrics)
        self.encoder = encoder or EncoderClient(settings.encoder_address, settings.encoder_timeout_s)
        self.lifecycle = Lifecycle(settings, index, store, self.users, metrics)
        self.retriever = Retriever(settings, index, metrics)
        self.writer = CatalogueWriter(self.lifecycle, store, index, self.encoder)

    def _known_ids(self, s: Serving, ids, field: str) -> list[int]:
        ids = [int(a) for a in ids]
        if len(ids) > self.settings.max_ids:
            raise invalid_argument({field: f"at most {self.settings.max_ids} ids, got {len(ids)}"})
        for j, a in enumerate(ids):
            if a not in s.model.pos and a not in s.extra:
                raise not_found("anime", str(a), reason="ANIME_NOT_FOUND", field=f"{field}[{j}]")
        return ids

    # ---- RPCs ------------------------------------------------------------------------
    def RecommendFromFavourites(self, request, context):
        s = self.lifecycle.current()
        if not request.liked_ids:
            raise invalid_argument({"liked_ids": "give at least one liked anime"})
        liked = self._known_ids(s, request.liked_ids, "liked_ids")
        disliked = self._known_ids(s, request.disliked_ids, "disliked_ids")
        weights = list(request.liked_weights)
        if weights and len(weights) != len(liked):
            raise invalid_argument({"liked_weights": f"{len(weights)} weights for {len(liked)} liked ids"})
        bad = [
            (f"liked_weights[{j}]", f"must be in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {w:.3g}")
            for j, w in enumerate(weights)
            if not np.float32(MIN_WEIGHT) <= w <= MAX_WEIGHT
        ]  # as float32, as sent; NaN fails too
        if bad:
            raise invalid_argument(bad[:10])
        excluded = set(disliked) | (set() if request.options.filters.include_liked else set(liked))
        dis = np.stack([content_of(s, a) for a in disliked]) if disliked else None
        return self.retriever.page(
            request,
            s,
            request.options,
            Query(
                kind="favourites",
                vector_fn=lambda s: s.model.favourites_vector(liked, weights, s.extra),
                wmf_fn=lambda s: s.model.wmf_scores_favourites(liked, weights),
                excluded=excluded,
                anchors=[anchor_of(s, a) for a in liked[:20]],
                dislikes=dis,
                wmf_refused=wmf_refusal(s, liked),
            ),
        )

    def RecommendForUser(self, request, context):
        s = self.lifecycle.current()
        uid = int(request.user_id)
        try:
            online = self.users.get(s, uid) if uid > 0 else None
        except IndexUnavailable as e:
            # no users collection: a training user still gets their trained vector; a user known
            # only through feedback cannot be served right now
            log.warning("users collection unavailable: %s", e)
            online = None
            if uid not in s.model.user_pos and self.feedback.has_user(uid):
                raise unavailable(
                    "the users collection cannot be reached", reason="USERS_UNAVAILABLE", retry_after_s=2.0
                ) from None
        if online is not None:
            return self._online_user_page(request, context, s, online)
        u = s.model.user_pos.get(uid)
        if u is None:
            raise not_found("user", str(request.user_id), reason="USER_NOT_FOUND", field="user_id")
        h = s.model.train[u]
        history = [int(s.model.item_ids[i]) for i in h.indices]
        top = [int(s.model.item_ids[i]) for i in h.indices[np.argsort(-h.data, kind="stable")[:10]]]
        excluded = set() if request.options.filters.include_liked else set(history)
        return self.retriever.page(
            request,
            s,
            request.options,
            Query(
                kind="user",
                vector_fn=lambda s: s.model.user_vector(int(request.user_id)),
                wmf_fn=lambda s: s.model.wmf_scores_user(int(request.user_id)),
                excluded=excluded,
                anchors=[anchor_of(s, a) for a in top],
            ),
        )

    def _online_user_page(self, request, context, s: Serving, online):
        """A user updated by feedback: their stored vector; their whole list (history and
        feedback, liked or not) is never recommended back, the liked part is with include_liked."""
        liked = online.liked
        listed = set(online.listed)
        excluded = (listed - set(liked)) if request.options.filters.include_liked else listed
        top = [a for a, _ in sorted(liked.items(), key=lambda p: -p[1]) if a in s.model.pos or a in s.extra][:10]
        return self.retriever.page(
            request,
            s,
            request.options,
            Query(
                kind="user",
                vector_fn=lambda s: online.vector,
                wmf_fn=lambda s: wmf_scores(s.model, online.listed),
                excluded=excluded,
                anchors=[anchor_of(s, a) for a in top],
            ),
        )

    def RecordFeedback(self, request, context):
        s = self.lifecycle.current()
        events = self._feedback_events(s, request.events)
        try:
            result, updated = self.users.record(s, events)
        except ValueError as e:
            if isinstance(e, FeedbackConflict):
                i, eid = e.conflicts[0]
                raise already_exists(
                    f"event_id {eid!r} was already used for a different event; nothing recorded",
                    reason="EVENT_ID_REUSED",
                    field=f"events[{i}].event_id",
                ) from None
            where, _, problem = str(e).partition(": ")  # the store's own check: "events[i].<field>: <problem>"
            raise invalid_argument({where: problem or str(e)}) from None
        log.info(
            "feedback recorded",
            extra={
                "applied": result.applied,
                "duplicates": result.duplicates,
                "users": len(updated),
                "version": s.version,
            },
        )
        return ranker_pb2.FeedbackResult(
            applied=result.applied, duplicates=result.duplicates, updated_user_ids=updated, model_version=s.version
        )

    def _feedback_events(self, s: Serving, raw) -> list[FeedbackEvent]:
        """Validate a batch (every problem, by field path) into store events."""
        if not raw:
            raise invalid_argument({"events": "give at least one event"})
        if len(raw) > self.settings.max_feedback_events:
            raise invalid_argument(
                {
                    "events": f"at most {self.settings.max_feedback_events} events per call, "
                    f"got {len(raw)}: split the batch"
                }
            )
        bad, out = [], []
        for i, e in enumerate(raw):
            kind = FEEDBACK_KINDS.get(e.kind)
            problems = feedback_problems(e, kind)
            if e.anime_id <= 0:
                problems.append(("anime_id", "must be > 0"))
            bad += [(f"events[{i}].{f}", d) for f, d in problems]
            if not problems:
                assert kind is not None  # else feedback_problems reported the kind
                out.append(
                    FeedbackEvent(
                        e.event_id, int(e.user_id), int(e.anime_id), kind, e.score or None, occurred_at_seconds(e)
                    )
                )
        if bad:
            raise invalid_argument(bad)
        for i, e in enumerate(out):
            if e.anime_id not in s.model.pos and e.anime_id not in s.extra:
                raise not_found("anime", str(e.anime_id), reason="ANIME_NOT_FOUND", field=f"events[{i}].anime_id")
        return out

    def SimilarItems(self, request, context):
        s = self.lifecycle.current()
        (aid,) = self._known_ids(s, [request.anime_id], "anime_id")
        return self.retriever.page(
            request,
            s,
            request.options,
            Query(
                kind="similar",
                vector_fn=lambda s: s.model.favourites_vector([aid], None, s.extra),
                wmf_fn=lambda s: s.model.wmf_scores_favourites([aid], None),
                excluded={aid},
                anchors=[anchor_of(s, aid)],
                wmf_refused=wmf_refusal(s, [aid]),
            ),
        )

    def RecommendFromVector(self, request, context):
        s = self.lifecycle.current()
        m = s.model
        dim = int(m.manifest["encoder"]["dim"])
        vec = np.asarray(request.content_vector, np.float32)
        if len(vec) != dim:
            raise invalid_argument({"content_vector": f"length {len(vec)}, the model's encoder gives {dim}"})
        norm = float(np.linalg.norm(vec.astype(np.float64)))  # float64: no overflow for huge entries
        if not np.all(np.isfinite(vec)) or not MIN_VECTOR_NORM <= norm <= MAX_VECTOR_NORM:
            raise invalid_argument(
                {
                    "content_vector": f"must be finite with L2 norm in [{MIN_VECTOR_NORM:g}, "
                    f"{MAX_VECTOR_NORM:g}] (the encoder's vectors have norm 1), "
                    f"got {norm:.3g}"
                }
            )
        fp = m.manifest["encoder"]["fingerprint"]
        if request.encoder_fingerprint and request.encoder_fingerprint != fp:
            raise failed_precondition(
                f"content vector from encoder {request.encoder_fingerprint[:40]!r}, model uses {fp}",
                reason="ENCODER_MISMATCH",
            )
        if len(request.query_text) > MAX_SYNOPSIS:
            raise invalid_argument({"query_text": f"at most {MAX_SYNOPSIS} characters, got {len(request.query_text)}"})
        liked = self._known_ids(s, request.liked_ids, "liked_ids")
        excluded = set() if request.options.filters.include_liked else set(liked)
        w = m.whiten(vec)
        content = m.semantic_vector(None if w is None else w[0], m.tfidf_vector(request.query_text or None))
        return self.retriever.page(
            request,
            s,
            request.options,
            Query(
                kind="text",
                vector_fn=lambda s: s.model.text_vector(vec, request.query_text or None),
                wmf_fn=None,
                excluded=excluded,
                anchors=[anchor_of(s, a) for a in liked[:20]],
                query_content=content,
                query_text=request.query_text,
            ),
        )

    def UpsertAnime(self, request, context):
        return self.writer.upsert(request, context)

    def GetModelInfo(self, request, context):
        s = self.lifecycle.current()
        info = model_info(s)
        info.next_model = next_model_status(self.settings.next_model_file)
        return common_pb2.GetModelInfoResponse(model=info, limits=self.settings.limits.to_proto())

    def ListCatalog(self, request, context):
        s = self.lifecycle.current()
        size = request.page_size or 1000
        if not 0 < size <= 5000:
            raise invalid_argument({"page_size": f"must be in 1..5000 (0 means 1000), got {request.page_size}"})
        digest = request_digest(ranker_pb2.ListCatalogRequest(), s.version)
        offset = decode_page_token(request.page_token, digest, field="page_token")
        entries = s.catalog()
        page = entries[offset : offset + size]
        more = offset + size < len(entries)
        return ranker_pb2.ListCatalogResponse(
            entries=page,
            model_version=s.version,
            next_page_token=encode_page_token(offset + size, digest) if more else "",
        )

"""GatewayService: validate, resolve titles, call the encoder and the ranker, relay how it was served.

    request → input limits → title resolution (TitleIndex snapshot) → ranker (and, for free text,
    the encoder first) with bounded deadlines → response with the ranker's ServedBy
Free text is the only path that needs the encoder: while it is down, SearchText fails with
UNAVAILABLE and everything else keeps working.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import numpy as np
from google.rpc import error_details_pb2

from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.errors import ServiceError, invalid_argument, not_found, resource_exhausted, unavailable
from anime2vec.serving.feedback_input import FEEDBACK_KINDS, feedback_problems
from anime2vec.serving.limits import LearntLimits
from anime2vec.serving.metrics import Metrics
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ranker_pb2

from . import mal_import
from .anime_input import anime_id_problem, anime_input_problems
from .catalog import CatalogueSync, entry_from_input
from .downstream import REPLACE_CATALOGUE_KEY, Ranker, deadline
from .filters import filter_problems, unanswerable_error, unknown_values_error
from .settings import GatewaySettings

log = logging.getLogger("services.gateway")

DEFAULT_RESOLVE_LIMIT, MAX_RESOLVE_LIMIT = 10, 50
# Autocomplete candidates below this score share little more than letters with the query.
MIN_CANDIDATE_SCORE = 50.0
# MalEntry.status back to the spelling MAL exports.
MAL_STATUS_NAMES = {
    "watching": "Watching",
    "completed": "Completed",
    "on_hold": "On-Hold",
    "dropped": "Dropped",
    "plan_to_watch": "Plan to Watch",
}
# Ranker UpsertAnime encodes the text before it answers: give it the encoder's time on top.
_UPSERT_EXTRA_S = 10.0
# Ranker RecordFeedback fsyncs, then recomputes every user of the batch (a fold-in each).
_FEEDBACK_EXTRA_S = 10.0


@dataclass
class Resolved:
    """One AnimeRef of a request, resolved."""

    field: str  # its path in the request, e.g. "favourites[2].title"
    query: common_pb2.AnimeRef
    anime_id: int
    title: str
    match_score: float
    matched_name: str

    def message(self) -> gateway_pb2.ResolvedAnime:
        return gateway_pb2.ResolvedAnime(
            query=self.query,
            anime_id=self.anime_id,
            title=self.title,
            match_score=self.match_score,
            matched_name=self.matched_name,
        )


class _Problems:
    """Collects every bad field of a request, so one answer names them all."""

    def __init__(self) -> None:
        self.invalid: list[tuple[str, str]] = []
        self.missing: list[tuple[str, str, list[str]]] = []  # (field, title, suggestions)
        self.known_lists: dict[str, str] = {}  # a filter's known genres/types, for invalid
        self.unanswerable: list[tuple[str, str]] = []  # valid filters the catalogue cannot match

    def raise_if_any(self) -> None:
        if self.invalid or self.unanswerable:
            invalid = (
                self.invalid
                + [
                    (f, f"no anime matches {t!r}" + (f"; did you mean: {', '.join(map(repr, s))}?" if s else ""))
                    for f, t, s in self.missing
                ]
                + self.unanswerable
            )
            if self.known_lists:
                raise unknown_values_error(invalid, self.known_lists)
            raise unanswerable_error(invalid) if self.unanswerable else invalid_argument(invalid)
        if self.missing:
            field, title, suggestions = self.missing[0]
            error = not_found("anime", title, reason="ANIME_NOT_FOUND", suggestions=suggestions, field=field)
            if len(self.missing) > 1:  # name every unresolved field, the first one in full
                error = _with_violations(error, [(f, f"no anime matches {t!r}") for f, t, _ in self.missing])
            raise error


def _with_violations(error: ServiceError, violations: list[tuple[str, str]]) -> ServiceError:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    details = [d for d in error.details if not isinstance(d, error_details_pb2.BadRequest)] + [bad]
    others = "; ".join(f"{f}: {d}" for f, d in violations[1:])
    return ServiceError(error.code, f"{error.message}; also {others}", details)


def _first_mentions(resolved: list[Resolved]) -> dict[int, str]:
    """anime id → the field that named it first, in request order (duplicates are sent once)."""
    out: dict[int, str] = {}
    for r in resolved:
        out.setdefault(r.anime_id, r.field)
    return out


def validate_options(opts: common_pb2.RecommendOptions, problems: _Problems, max_limit: int) -> None:
    """What the gateway can check before any downstream call (the ranker checks the rest);
    `max_limit`: the ranker's, as it last reported it (anime2vec/serving/limits.py)."""
    if opts.limit < 0:
        problems.invalid.append(("options.limit", f"must be >= 0 (0 means the default), got {opts.limit}"))
    elif opts.limit > max_limit:
        problems.invalid.append(("options.limit", f"at most {max_limit}, got {opts.limit}"))
    if not math.isfinite(opts.diversity) or not 0 <= opts.diversity <= 1:
        problems.invalid.append(("options.diversity", f"must be in [0, 1], got {opts.diversity}"))
    f = opts.filters
    if f.HasField("year_min") and f.HasField("year_max") and f.year_min > f.year_max:  # as the ranker words it
        problems.invalid.append(("options.filters.year_min", f"{f.year_min} is after year_max {f.year_max}"))


class TextVectors:
    """A small LRU of free-text query vectors. The ranker binds a page token to the exact query
    vector, and the encoder's float output may differ in the last bits with the batch a text lands
    in; reusing the first page's vector keeps the later pages' tokens valid (and saves encoder work)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> tuple[np.ndarray, str] | None:
        with self._lock:
            hit = self._entries.get(text)
            if hit is not None:
                self._entries.move_to_end(text)
            return hit

    def put(self, text: str, vector: np.ndarray, fingerprint: str) -> None:
        if not self.size:
            return
        with self._lock:
            self._entries[text] = (vector, fingerprint)
            self._entries.move_to_end(text)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        ranker: Ranker,
        encoder: EncoderClient,
        catalogue: CatalogueSync,
        metrics: Metrics,
        limits: LearntLimits | None = None,
    ):
        self.settings, self.ranker, self.encoder, self.catalogue, self.metrics = (
            settings,
            ranker,
            encoder,
            catalogue,
            metrics,
        )
        self.limits = limits or LearntLimits()  # the ranker's request limits, learnt from its GetModelInfo
        self.text_vectors = TextVectors(settings.text_cache_size)

    # ---- shared steps ------------------------------------------------------------------
    def _check_options(self, opts: common_pb2.RecommendOptions, problems: _Problems) -> None:
        """validate_options, and the filters against the catalogue: a filter that cannot match
        is an error that says why, not an empty list. Without a snapshot yet the ranker applies
        the filters as given."""
        validate_options(opts, problems, self.limits.current.max_limit)
        current = self.catalogue.current
        if current is not None:
            found = filter_problems(opts.filters, current.filterable)
            problems.invalid += found.unknown
            problems.known_lists.update(found.known_lists)
            problems.unanswerable += found.unanswerable

    def _check_title(self, field: str, title: str, problems: _Problems) -> bool:
        if not title.strip():
            problems.invalid.append((field, "blank title"))
        elif len(title) > self.settings.max_title_chars:
            problems.invalid.append(
                (field, f"{len(title)} characters; a title has at most {self.settings.max_title_chars}")
            )
        else:
            return True
        return False

    def _resolve(self, refs, field: str, problems: _Problems) -> list[Resolved]:
        """Resolve the AnimeRefs of a repeated field; problems collects what cannot be resolved."""
        if len(refs) > self.settings.max_favourites:
            problems.invalid.append((field, f"at most {self.settings.max_favourites} anime, got {len(refs)}"))
            return []
        resolved = (self._resolve_one(ref, f"{field}[{i}]", problems) for i, ref in enumerate(refs))
        return [r for r in resolved if r is not None]

    def _resolve_one(self, ref: common_pb2.AnimeRef, path: str, problems: _Problems) -> Resolved | None:
        """An id as given (the ranker knows best whether it exists), a title through the index."""
        kind = ref.WhichOneof("ref")
        if kind is None:
            problems.invalid.append((path, "set anime_id or title"))
        elif kind == "anime_id":
            why = anime_id_problem(ref.anime_id)
            if why is None:
                current = self.catalogue.current
                return Resolved(
                    f"{path}.anime_id", ref, ref.anime_id, current.title(ref.anime_id) if current else "", 100.0, ""
                )
            problems.invalid.append((f"{path}.anime_id", why))
        elif self._check_title(f"{path}.title", ref.title, problems):
            catalogue = self.catalogue.get()
            try:
                r = catalogue.index.resolve(ref.title)
            except ValueError as e:
                problems.invalid.append((f"{path}.title", str(e)))
                return None
            if r.anime_id is not None:
                return Resolved(
                    f"{path}.title",
                    ref,
                    r.anime_id,
                    catalogue.title(r.anime_id),
                    r.score,
                    catalogue.matched_name(r.anime_id, ref.title),
                )
            problems.missing.append((f"{path}.title", ref.title, [x.title for x in r.suggestions]))
        return None

    def _relay(self, ranked: ranker_pb2.RankedList) -> gateway_pb2.RecommendResponse:
        served = ranked.served_by
        self.catalogue.notice_version(served.model_version)
        if served.degraded:
            self.metrics.fallbacks.labels(service="gateway", reason=served.degraded_reason or "degraded").inc()
        return gateway_pb2.RecommendResponse(
            recommendations=ranked.recommendations, next_page_token=ranked.next_page_token, served_by=served
        )

    # ---- RPCs --------------------------------------------------------------------------
    def Recommend(self, request, context):
        problems = _Problems()
        if not request.favourites:
            problems.invalid.append(("favourites", "give at least one liked anime (by anime_id or title)"))
        self._check_options(request.options, problems)
        liked = self._resolve(request.favourites, "favourites", problems)
        disliked = self._resolve(request.disliked, "disliked", problems)
        problems.raise_if_any()
        liked_at, disliked_at = _first_mentions(liked), _first_mentions(disliked)
        clash = [
            (r.field, f"anime {r.anime_id} is also a favourite ({liked_at[r.anime_id]})")
            for r in disliked
            if r.anime_id in liked_at
        ]
        if clash:
            raise invalid_argument(clash)
        liked_ids, disliked_ids = list(liked_at), list(disliked_at)
        fields = {
            "liked_ids": "favourites",
            "disliked_ids": "disliked",
            **{f"liked_ids[{j}]": liked_at[a] for j, a in enumerate(liked_ids)},
            **{f"disliked_ids[{j}]": disliked_at[a] for j, a in enumerate(disliked_ids)},
        }
        ranked = self.ranker.recommend_from_favourites(
            ranker_pb2.RecommendFromFavouritesRequest(
                liked_ids=liked_ids, disliked_ids=disliked_ids, options=request.options
            ),
            context,
            fields=fields,
        )
        resp = self._relay(ranked)
        resp.favourites.extend(r.message() for r in liked)
        resp.disliked.extend(r.message() for r in disliked)
        return resp

    def RecommendForUser(self, request, context):
        problems = _Problems()
        self._check_options(request.options, problems)
        problems.raise_if_any()
        return self._relay(self.ranker.recommend_for_user(request, context))

    def Similar(self, request, context):
        problems = _Problems()
        self._check_options(request.options, problems)
        anime = self._resolve_one(request.anime, "anime", problems)
        problems.raise_if_any()
        ranked = self.ranker.similar_items(
            ranker_pb2.SimilarItemsRequest(anime_id=anime.anime_id, options=request.options),
            context,
            fields={"anime_id": anime.field},
        )
        resp = self._relay(ranked)
        resp.favourites.append(anime.message())
        return resp

    def SearchText(self, request, context):
        problems = _Problems()
        query = request.query
        if not query.strip():
            problems.invalid.append(("query", "describe what the anime is about (blank query)"))
        elif len(query) > self.settings.max_query_chars:
            problems.invalid.append(("query", f"{len(query)} characters; at most {self.settings.max_query_chars}"))
        self._check_options(request.options, problems)
        problems.raise_if_any()
        query = " ".join(query.split())
        vector, fingerprint = self._encode(query, context)
        try:
            ranked = self.ranker.recommend_from_vector(
                ranker_pb2.RecommendFromVectorRequest(
                    content_vector=vector.tolist(),
                    options=request.options,
                    encoder_fingerprint=fingerprint,
                    query_text=query,
                ),
                context,
            )
        except ServiceError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # encoder and model disagree: forget old vectors
                self.text_vectors.clear()
            raise
        return self._relay(ranked)

    def _encode(self, query: str, context) -> tuple[np.ndarray, str]:
        cached = self.text_vectors.get(query)
        if cached is not None:
            return cached
        try:
            vectors, fingerprint = self.encoder.encode(
                [query], timeout_s=deadline(context, self.settings.encoder_timeout_s)
            )
        except ServiceError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:  # e.message names the encoder's address: logged only
                log.warning("encoder unavailable for free text: %s", e.message)
                raise unavailable(
                    "free-text search needs the encoder, which is unavailable; favourites, similar "
                    "and title queries still work",
                    reason="ENCODER_UNAVAILABLE",
                    retry_after_s=2.0,
                ) from None
            raise e.renamed({"texts[0]": "query", "texts": "query"}) from None
        self.text_vectors.put(query, vectors[0], fingerprint)
        return vectors[0], fingerprint

    def ImportMalList(self, request, context):
        s = self.settings
        problems = _Problems()
        if not request.mal_xml:
            problems.invalid.append(("mal_xml", "empty: send the XML file MyAnimeList exports (optionally gzipped)"))
        if request.min_score and not 1 <= request.min_score <= 10:
            problems.invalid.append(
                ("min_score", f"must be 0 (default {s.default_min_score}) or 1..10, got {request.min_score}")
            )
        self._check_options(request.options, problems)
        problems.raise_if_any()
        if len(request.mal_xml) > s.max_mal_xml_bytes:
            raise resource_exhausted(
                f"mal_xml is {len(request.mal_xml):,} bytes; the limit is {s.max_mal_xml_bytes:,}",
                reason="MAL_XML_TOO_LARGE",
            )
        catalogue = self.catalogue.get()
        try:
            export = mal_import.parse_mal_export(request.mal_xml, max_bytes=s.max_mal_xml_bytes)
        except mal_import.MalImportError as e:
            if e.too_large:  # size limits (upload, decompressed, entries): RESOURCE_EXHAUSTED, not bad input
                raise resource_exhausted(f"mal_xml: {e}", reason="MAL_XML_TOO_LARGE") from None
            raise invalid_argument({"mal_xml": str(e)}) from None
        known = tuple(e for e in export.entries if e.anime_id in catalogue)
        liked, disliked = mal_import.favourites_from(
            mal_import.MalList(known, export.user_name), max_n=max(1, len(known))
        )
        by_id = {e.anime_id: e for e in known}
        min_score = request.min_score or s.default_min_score
        liked = [(a, w) for a, w in liked if by_id[a].score is None or by_id[a].score >= min_score][: s.max_favourites]
        if not liked:
            raise invalid_argument(
                {
                    "mal_xml": (
                        f"no usable favourite among {len(export.entries)} entries ({len(export.entries) - len(known)} not "
                        f"in the catalogue): a favourite is a watched, completed or on-hold anime scored at least "
                        f"{min_score}, or unscored"
                    )
                }
            )
        liked_ids = [a for a, _ in liked]
        max_ids = self.limits.current.max_ids
        disliked = disliked[:max_ids]
        opts = common_pb2.RecommendOptions()
        opts.CopyFrom(request.options)
        if not opts.filters.include_liked:  # the whole list is already known to its owner
            seen = set(liked_ids) | set(disliked) | set(opts.filters.exclude_ids)
            rest = [e.anime_id for e in export.entries if e.anime_id not in seen]
            opts.filters.exclude_ids.extend(rest[: max(0, max_ids - len(opts.filters.exclude_ids))])
        ranked = self.ranker.recommend_from_favourites(
            ranker_pb2.RecommendFromFavouritesRequest(
                liked_ids=liked_ids, liked_weights=[w for _, w in liked], disliked_ids=disliked, options=opts
            ),
            context,
            fields={
                "liked_ids": "mal_xml",
                "liked_weights": "mal_xml",
                "disliked_ids": "mal_xml",
                "options.filters.exclude_ids": "options.filters.exclude_ids (with the list's own entries)",
            },
        )
        relayed = self._relay(ranked)
        return gateway_pb2.ImportMalListResponse(
            username=export.user_name,
            entries_read=len(export.entries),
            entries_unknown=len(export.entries) - len(known),
            favourites=[
                gateway_pb2.ImportedFavourite(
                    anime_id=a,
                    title=catalogue.title(a),
                    score=by_id[a].score or 0,
                    status=MAL_STATUS_NAMES[by_id[a].status],
                    weight=w,
                )
                for a, w in liked
            ],
            recommendations=relayed.recommendations,
            next_page_token=relayed.next_page_token,
            served_by=relayed.served_by,
        )

    def AddAnime(self, request, context):
        problems = _Problems()
        if request.HasField("anime_id") and (why := anime_id_problem(request.anime_id)):
            problems.invalid.append(("anime_id", why))
        problems.invalid += anime_input_problems(
            request.anime, self.settings.max_title_chars, self.settings.max_synopsis_chars
        )
        problems.raise_if_any()
        replace = ((REPLACE_CATALOGUE_KEY, str(request.anime_id)),) if request.HasField("anime_id") else ()
        resp = self.ranker.upsert_anime(
            ranker_pb2.UpsertAnimeRequest(
                anime_id=request.anime_id if request.HasField("anime_id") else None, anime=request.anime
            ),
            context,
            timeout_s=self.settings.ranker_timeout_s + _UPSERT_EXTRA_S,
            metadata=replace,
        )
        self.catalogue.add(entry_from_input(resp.anime_id, request.anime), resp.model_version)
        return gateway_pb2.AddAnimeResponse(
            anime_id=resp.anime_id, created=resp.created, model_version=resp.model_version
        )

    def ResolveTitles(self, request, context):
        problems = _Problems()
        self._check_title("query", request.query, problems)
        limit = request.limit or DEFAULT_RESOLVE_LIMIT
        if not 0 < limit <= MAX_RESOLVE_LIMIT:
            problems.invalid.append(
                ("limit", f"must be 0 (default {DEFAULT_RESOLVE_LIMIT}) or 1..{MAX_RESOLVE_LIMIT}, got {request.limit}")
            )
        problems.raise_if_any()
        catalogue = self.catalogue.get()
        try:
            found = catalogue.index.search(request.query, limit)
        except ValueError as e:
            raise invalid_argument({"query": str(e)}) from None
        out = gateway_pb2.ResolveTitlesResponse()
        for s in found:
            if s.score < MIN_CANDIDATE_SCORE:
                break  # best first: the rest score lower still
            f = catalogue.facets(s.anime_id)
            c = out.candidates.add(
                anime_id=s.anime_id,
                title=s.title,
                match_score=s.score,
                type=f["type"],
                matched_name=catalogue.matched_name(s.anime_id, request.query),
                members=f["members"],
            )
            if f["year"] is not None:
                c.year = f["year"]
        return out

    def RecordFeedback(
        self, request: gateway_pb2.RecordFeedbackRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RecordFeedbackResponse:
        problems = _Problems()
        n = len(request.events)
        most = min(self.settings.max_feedback_events, self.limits.current.max_feedback_events)
        if not n:
            problems.invalid.append(("events", "give at least one event"))
        elif n > most:  # before resolving anything: a request this big is not looked at
            problems.invalid.append(("events", f"at most {most} events per call, got {n}: split the batch"))
        problems.raise_if_any()
        resolved: list[Resolved | None] = []
        for i, e in enumerate(request.events):
            problems.invalid.extend(
                (f"events[{i}].{f}", d) for f, d in feedback_problems(e, FEEDBACK_KINDS.get(e.kind))
            )
            resolved.append(self._resolve_one(e.anime, f"events[{i}].anime", problems))
        problems.raise_if_any()
        found = [r for r in resolved if r is not None]  # all of them: each None added a problem raised above
        batch = ranker_pb2.FeedbackBatch()
        for e, r in zip(request.events, found):
            out = batch.events.add(
                event_id=e.event_id, user_id=e.user_id, anime_id=r.anime_id, kind=e.kind, score=e.score
            )
            if e.HasField("occurred_at"):  # left unset otherwise: a retry must send the same event
                out.occurred_at.CopyFrom(e.occurred_at)
        fields = {f"events[{i}].anime_id": r.field for i, r in enumerate(found)}
        result = self.ranker.record_feedback(
            batch, context, fields=fields, timeout_s=self.settings.ranker_timeout_s + _FEEDBACK_EXTRA_S
        )
        self.catalogue.notice_version(result.model_version)
        return gateway_pb2.RecordFeedbackResponse(
            applied=result.applied,
            duplicates=result.duplicates,
            updated_user_ids=result.updated_user_ids,
            model_version=result.model_version,
            anime=[r.message() for r in found],
        )

    def GetModelInfo(self, request, context):
        resp = self.limits.learn(self.ranker.get_model_info(request, context))
        self.catalogue.notice_version(resp.model.version)
        return resp

"""RankerService: one request from validated options to a ranked page.

    request → validate → query vector (by strategy, with fallback) → candidates
      (Qdrant search with payload filters for DropoutNet; in-memory for WMF / popularity)
      → optional re-rank (diversity, dislikes) → page → explanations
The served model is swapped atomically (`self._serving`): a request keeps the version it
started with, so a promotion never fails or mixes a request.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
from google.rpc import error_details_pb2

from anime2vec.bundle import BundleError, list_bundles, load_bundle
from anime2vec.data.text import build_texts
from anime2vec.feedback import FeedbackConflict, FeedbackEvent, FeedbackStore
from anime2vec.index.base import IndexUnavailable, ItemIndex, ItemPoint
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.errors import (
    DOMAIN,
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
    unavailable,
)
from anime2vec.serving.feedback_input import FEEDBACK_KINDS, feedback_problems, occurred_at_seconds
from anime2vec.serving.metrics import Metrics, set_model_info
from anime2vec.serving.pagination import decode_page_token, encode_page_token, request_digest
from anime2vec.serving_model.model import ItemMeta, ServingModel
from anime2vec.serving_model.users import wmf_scores
from anime2vec.store.added_anime import ASSIGNED_IDS, MAX_ANIME_ID, AddedAnime, AddedAnimeStore, IdsExhausted
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc

from .explanations import Anchor, Subject, TermIndex, explain, term_index
from .online_users import OnlineUsers
from .ranking import Candidate, CatalogueFilter, mmr, reranked, search_filter, validate_options
from .settings import RankerSettings

log = logging.getLogger(__name__)
S = common_pb2
MAX_TITLE, MAX_SYNOPSIS, MAX_GENRES = 300, 20_000, 30
MAX_EPISODES = 10_000              # the longest-running series have a few thousand
# liked_weights are confidences, 0.5-5 in training: huge ones make the ALS fold-in ill-conditioned,
# and below ~1e-3 the fold-in and the weighted means vanish, so every score is 0
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0
# content vectors come from the encoder, L2-normalised (norm 1); far from it they were not, and a
# vector near 0 or near float32's limits ranks nothing meaningful (every score 0, or not finite)
MIN_VECTOR_NORM, MAX_VECTOR_NORM = 0.5, 2.0
# UpsertAnime replaces a *catalogue* anime (one the bundle holds) only when the call carries this
# metadata with that anime's id: an id sent by mistake, or to vandalise, cannot rewrite the catalogue
REPLACE_CATALOGUE_KEY = "a2v-replace-catalogue-anime"
TYPES = ("TV", "Movie", "OVA", "ONA", "Special", "Music")


@dataclass
class Serving:
    """One model version, ready: the model, its filters, and the anime added at run time."""
    model: ServingModel
    filt: CatalogueFilter
    extra: dict[int, ItemMeta]
    # ListCatalog pages come from one list built once per change of `extra` (not once per page)
    _catalog: tuple[int, list] | None = None
    generation: int = 0
    terms: TermIndex | None = None   # explanation terms of this version's catalogue
    # anime whose interactions the model was trained without (the evaluation's cold-item split):
    # scored from text like cold anime, but they have ratings, so they are not "cold start"
    held_out: frozenset[int] = frozenset()
    example_users: tuple[int, ...] = ()   # training users with the most interactions (GetModelInfo)
    # the store of added anime as this version serves it: every write up to added_revision is
    # applied (catalog_follower.py asks for the later ones), `applied` the revision of each anime
    added_revision: int = 0
    applied: dict[int, int] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.model.version

    def catalog(self) -> list:
        cached = self._catalog
        if cached is None or cached[0] != self.generation:
            cached = self._catalog = (self.generation, catalog_entries(self))
        return cached[1]


def load_serving(model: ServingModel) -> Serving:
    cat = model.catalog
    filt = CatalogueFilter(model.item_ids, [list(g or []) for g in cat["genres"]],
                           list(cat["type"]), [None if pd.isna(y) else int(y) for y in cat["year"]],
                           cold=~np.asarray(model.warm, bool))
    return Serving(model, filt, {}, terms=term_index(cat, model.content), held_out=held_out_items(model),
                   example_users=example_users(model))


def held_out_items(model: ServingModel) -> frozenset[int]:
    """Anime ids of the bundle's val/test items (positions in split.*_items) that the model has
    no factors for: their interactions exist but were held out of training."""
    arrays = model.bundle.arrays
    pos = [np.asarray(arrays[k], np.int64) for k in ("split.val_items", "split.test_items") if k in arrays]
    if not pos:
        return frozenset()
    pos = np.concatenate(pos)
    pos = pos[(pos >= 0) & (pos < len(model.item_ids))]
    return frozenset(int(a) for a in model.item_ids[pos[~model.warm[pos]]])


def example_users(model: ServingModel, n: int = 10) -> tuple[int, ...]:
    """The n users with the most training interactions, most first (ties: lower id first)."""
    counts = np.diff(model.train.indptr)
    order = np.lexsort((model.user_ids, -counts))[:n]
    return tuple(int(model.user_ids[i]) for i in order if counts[i] > 0)


# Why a cold_start_only request skips WMF (ServedBy.degraded_reason): it goes to popularity among
# the cold anime instead.
WMF_COLD_REFUSAL = ("WMF cannot serve cold_start_only: it has no factors for anime without interactions "
                    "(used popularity among them)")


def has_cold(s: Serving) -> bool:
    """Whether a cold_start_only filter can match anything: a cold catalogue or added anime."""
    return bool(s.filt.cold.any()) or any(m.payload.get("cold") for m in s.extra.values())


def cold_unanswerable(s: Serving) -> ServiceError:
    """INVALID_ARGUMENT, reason FILTER_UNANSWERABLE (as the gateway's catalogue checks): a
    cold_start_only filter when the served version has no cold anime at all."""
    field = "options.filters.cold_start_only"
    why = (f"model {s.version} has interactions for every anime it serves and none was added since, so "
           "a cold_start_only filter matches nothing: leave it out")
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}", [
        error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
            field=field, description=why)]),
        error_details_pb2.ErrorInfo(reason="FILTER_UNANSWERABLE", domain=DOMAIN)])


def wmf_refusal(s: Serving, liked: list[int]) -> str:
    """Why WMF cannot fold in these favourites: none of them has factors in the model."""
    def why(a: int) -> str:
        title = s.extra[a].payload.get("title", "") if a in s.extra else s.model.titles[s.model.pos[a]]
        return f"{title or a}: " + ("its ratings were held out of this model's training" if a in s.held_out
                                    else "no ratings in the training data")
    named = "; ".join(why(a) for a in liked[:3]) + ("; ..." if len(liked) > 3 else "")
    return f"WMF cannot serve this request: none of its anime has interactions in the model ({named})"


def anime_text(model: ServingModel, fields: dict) -> str:
    """The text an anime is encoded from: the bundle's own recipe, so it matches training."""
    row = {**fields, "synonyms": tuple(fields.get("synonyms", ())), "genres": tuple(fields.get("genres", ())),
           "review": "", "title_japanese": ""}
    return build_texts(pd.DataFrame([row], index=[0]), model.manifest["encoder"]["recipe"]).iloc[0]


def payload_from_fields(anime_id: int, f: dict, cold: bool = True) -> dict:
    return {"anime_id": anime_id, "title": f.get("title", ""), "title_english": f.get("title_english", ""),
            "synonyms": list(f.get("synonyms", [])), "genres": list(f.get("genres", [])),
            "type": f.get("type", ""), "year": f.get("year"), "members": int(f.get("members") or 0),
            "cold": cold, "source": "upsert"}


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self, settings: RankerSettings, index: ItemIndex, store: AddedAnimeStore,
                 metrics: Metrics, encoder: EncoderClient | None = None, feedback: FeedbackStore | None = None):
        self.settings, self.index, self.store, self.metrics = settings, index, store, metrics
        self.feedback = feedback or FeedbackStore(settings.data_dir / "feedback.sqlite")
        self.users = OnlineUsers(self.feedback, index, metrics)
        self.encoder = encoder or EncoderClient(settings.encoder_address, settings.encoder_timeout_s)
        self._serving: Serving | None = None
        self._swap = threading.Lock()
        self._refused: tuple[str, tuple] | None = None   # (alias target, bundle files) last refused
        self._alias_problem: str | None = None             # why the alias could not be read, last poll
        self._upsert = threading.Lock()

    # ---- model lifecycle ---------------------------------------------------------------
    def activate(self, model: ServingModel) -> None:
        """Make `model` the served version: its collection must exist (built here if missing);
        added anime are re-embedded with its item tower; then the swap is one assignment."""
        serving = load_serving(model)
        if not self.index.has_version(model.version):
            log.info("building the Qdrant collection for %s (%d items)", model.version, len(model.item_ids))
            self.index.create_version(model.version, model.item_tower.shape[1], (
                ItemPoint(int(a), model.item_tower[i], model.payload(i)) for i, a in enumerate(model.item_ids)))
        self._replay_added(serving)
        with self._swap:
            previous, self._serving = self._serving, serving
        self.users.version_switched(previous.version if previous else None, model.version)
        set_model_info(self.metrics, "ranker", model.version, model.manifest["encoder"]["name"],
                       int(model.item_tower.shape[1]), offline_metrics(model.manifest))
        log.info("serving model %s", model.version)

    def _replay_added(self, serving: Serving) -> None:
        m, points = serving.model, []
        added = self.store.all()
        serving.added_revision = max((a.revision for a in added), default=0)
        for a in added:
            if a.anime_id > MAX_ANIME_ID:
                log.warning("added anime %d has an id above %d (accepted before ids were bounded): still served; "
                            "ids for new anime are assigned from %d on regardless", a.anime_id, MAX_ANIME_ID,
                            ASSIGNED_IDS.start)
        if added and not m.has_vectors:   # no item vectors to embed them: serve the rest, keep them stored
            log.warning("model %s has no item tower: %d added anime are not served by it", m.version, len(added))
            return
        points = [p for p in (self._serve_added(serving, a) for a in added) if p is not None]
        if points:
            self.index.upsert(points, version=m.version)
            log.info("replayed %d added anime into %s", len(points), m.version)

    def _serve_added(self, serving: Serving, a: AddedAnime) -> ItemPoint | None:
        """Put a stored anime into `serving.extra`; its index point (None when its encoder differs)."""
        m = serving.model
        if a.encoder_fingerprint != m.manifest["encoder"]["fingerprint"]:
            log.warning("added anime %d was encoded by %s, model %s uses %s: skipped until re-added",
                        a.anime_id, a.encoder_fingerprint, m.version, m.manifest["encoder"]["fingerprint"])
            return None
        vec, content, tfidf, cold, row = self._item_vectors(serving, a.anime_id, a.raw_vector,
                                                            anime_text(m, a.fields), a.fields)
        serving.extra[a.anime_id] = ItemMeta(a.anime_id, content, payload_from_fields(a.anime_id, a.fields, cold),
                                             tfidf, a.fields.get("synopsis") or "", row)
        serving.applied[a.anime_id] = a.revision
        return ItemPoint(a.anime_id, vec, serving.extra[a.anime_id].payload)

    def follow_added(self) -> int:
        """Serve the anime other replicas wrote to a shared store since the last call (in revision
        order; what this replica wrote itself is already served): called by catalog_follower.py.
        Returns how many were applied."""
        s = self._serving
        if s is None:
            return 0
        changes = self.store.changes_since(s.added_revision)
        if not changes:
            return 0
        with self._upsert:   # against this replica's own UpsertAnime of the same ids
            if self._serving is not s:   # a model switch replayed the store meanwhile: next call
                return 0
            todo = [a for a in changes if s.applied.get(a.anime_id, 0) < a.revision]
            if not s.model.has_vectors:
                todo = []
            points = [p for p in (self._serve_added(s, a) for a in todo) if p is not None]
            if points:
                self.index.upsert(points, version=s.version)
            s.added_revision = max(s.added_revision, changes[-1].revision)
            s.generation += 1
        if todo:
            log.info("serving %d anime added through other replicas", len(todo),
                     extra={"anime_ids": [a.anime_id for a in todo][:20], "revision": s.added_revision})
        return len(todo)

    def serving(self) -> Serving:
        s = self._serving
        if s is None:
            raise unavailable("no model loaded yet", reason="MODEL_NOT_LOADED", retry_after_s=2.0)
        return s

    def maybe_follow_alias(self) -> None:
        """Called periodically: load and serve the version the alias points to, if it moved.
        A target that cannot be served (no bundle, a bundle that does not verify, a failed load)
        is refused while the current version keeps serving, and counted in
        a2v_bundle_load_failures_total. A missing or invalid bundle is logged and counted once, then
        tried again only when the alias or the bundle's files change (re-hashing a large bundle on
        every poll would cost a core); a failed load (e.g. Qdrant unreachable) is retried each poll."""
        try:
            target = self.index.alias_target()
        except Exception as e:   # e.g. a Qdrant server down for a moment: ask again next poll, keep the thread
            if str(e) != self._alias_problem:   # once per problem, not once per poll
                log.warning("cannot read the alias: %s; still serving %s", e,
                            self._serving.version if self._serving else None)
            self._alias_problem = str(e)
            return
        self._alias_problem = None
        current = self._serving.version if self._serving else None
        if not target or target == current:
            return
        path = self.settings.model_store / target
        attempt = (target, _bundle_files(path))
        if attempt == self._refused:
            return
        if not path.is_dir():
            self._refuse(attempt, "missing", f"alias points to {target} but no such bundle in "
                                             f"{self.settings.model_store}; still serving {current}")
            return
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            self._refuse(attempt, "invalid", f"refusing to serve {target}: {e}; still serving {current}")
            return
        try:
            self.activate(ServingModel(bundle, device=self.settings.device or None))
        except Exception:
            log.exception("could not switch to %s; still serving %s", target, current)
            self.metrics.bundle_load_failures.labels(service="ranker", reason="error").inc()

    def _refuse(self, attempt: tuple[str, tuple], reason: str, message: str) -> None:
        self._refused = attempt
        self.metrics.bundle_load_failures.labels(service="ranker", reason=reason).inc()
        log.error(message, extra={"version": attempt[0], "reason": reason})

    # ---- shared request path ---------------------------------------------------------
    def _page(self, request, context, s: Serving, opts, *, query_kind: str,
              vector_fn, wmf_fn, excluded: set[int], anchors: list, dislikes: np.ndarray | None = None,
              query_content: np.ndarray | None = None, query_text: str = "",
              wmf_refused: str = "WMF cannot serve this request (no interactions to fold in)") -> ranker_pb2.RankedList:
        limit, diversity = validate_options(opts, self.settings.default_limit, self.settings.max_limit,
                                            self.settings.max_ids)
        offset = decode_page_token(opts.page_token, request_digest(request, s.version))
        flt = search_filter(opts.filters, excluded)
        if flt.cold_only and not has_cold(s):
            raise cold_unanswerable(s)
        requested = opts.strategy if opts.strategy not in (S.STRATEGY_UNSPECIFIED, S.STRATEGY_AUTO) else S.STRATEGY_DROPOUTNET
        chain = {S.STRATEGY_DROPOUTNET: [S.STRATEGY_DROPOUTNET, S.STRATEGY_WMF, S.STRATEGY_POPULARITY],
                 S.STRATEGY_WMF: [S.STRATEGY_WMF, S.STRATEGY_POPULARITY],
                 S.STRATEGY_POPULARITY: [S.STRATEGY_POPULARITY]}[requested]
        rerank = diversity > 0 or (dislikes is not None and len(dislikes) > 0)
        need = offset + limit + 1
        if need > self.settings.max_page_depth or (rerank and offset >= self.settings.rerank_pool):
            return ranker_pb2.RankedList(served_by=S.ServedBy(strategy=requested, model_version=s.version))
        reasons: list[str] = []
        cands: list[Candidate] | None = None
        served = requested
        for strategy in chain:
            served = strategy
            if strategy == S.STRATEGY_DROPOUTNET:
                if not s.model.has_vectors:
                    reasons.append("this model has no DropoutNet weights")
                    continue
                with self.index.search_expected():   # searches running meanwhile wait for ours: one batch
                    vec = vector_fn(s)
                    if vec is None:
                        reasons.append("DropoutNet cannot build a query vector for this request")
                        continue
                    pool = self.settings.rerank_pool if rerank else need
                    hits = self.index.search(vec, limit=pool if rerank else need - offset,
                                             offset=0 if rerank else offset, flt=flt, version=s.version,
                                             exact=self.settings.search_mode == "exact",
                                             oversampling=self.settings.search_oversampling)
                cands = [Candidate(h.anime_id, h.score, h.payload, self._content(s, h.anime_id)) for h in hits]
                if not rerank:
                    cands = [None] * offset + cands   # align with absolute positions
                break
            scores = None
            if strategy == S.STRATEGY_WMF:
                if flt.cold_only:   # every cold anime's WMF factors are zero: it would rank them all equal
                    reasons.append(WMF_COLD_REFUSAL)
                    continue
                scores = wmf_fn(s) if wmf_fn else None
                if scores is None:
                    reasons.append(wmf_refused)
                    continue
            else:
                scores = s.model.popularity
            mask = s.filt.mask(flt)
            idx = np.flatnonzero(mask)
            top = idx[np.argsort(-scores[idx], kind="stable")[: (self.settings.rerank_pool if rerank else need)]]
            cands = [Candidate(int(s.model.item_ids[i]), float(scores[i]), s.model.payload(i), s.model.content[i])
                     for i in top]
            break
        for r in reasons:
            self.metrics.fallbacks.labels(service="ranker", reason=r).inc()
        if rerank:
            cands = mmr(cands, diversity, dislikes)
        page = [c for c in cands[offset: offset + limit] if c is not None]
        has_more = len(cands) > offset + limit
        resp = ranker_pb2.RankedList(
            next_page_token=encode_page_token(offset + limit, request_digest(request, s.version)) if has_more else "",
            served_by=S.ServedBy(strategy=served, model_version=s.version,
                                 degraded=bool(reasons), degraded_reason="; ".join(reasons),
                                 scorer={S.STRATEGY_DROPOUTNET: s.model.manifest.get("model", "dropoutnet"),
                                         S.STRATEGY_WMF: "wmf", S.STRATEGY_POPULARITY: "popularity"}[served]
                                 + (f" + mmr({diversity:g})" if diversity > 0 else ""),
                                 reranked=reranked(diversity, 0 if dislikes is None else len(dislikes))))
        fallback = {S.STRATEGY_WMF: "wmf", S.STRATEGY_POPULARITY: "popularity"}.get(served)
        for rank, c in enumerate(page, start=offset + 1):
            p = c.payload
            text_only, held = bool(p.get("cold")), c.anime_id in s.held_out
            rec = resp.recommendations.add(anime_id=c.anime_id, title=p.get("title", ""), score=c.score,
                                           genres=p.get("genres") or [], type=p.get("type") or "", rank=rank,
                                           members=int(p.get("members") or 0), cold_start=text_only and not held,
                                           held_out=text_only and held)
            if p.get("year") is not None:
                rec.year = int(p["year"])
            if opts.explain:
                why, rec.explanation = explain(self._subject(s, c), anchors, query_kind, fallback=fallback,
                                               terms=s.terms, query_content=query_content, query_text=query_text)
                rec.reasons.extend(why)
        return resp

    def _content(self, s: Serving, anime_id: int) -> np.ndarray | None:
        if anime_id in s.extra:
            return s.extra[anime_id].content
        i = s.model.pos.get(anime_id)
        return None if i is None else s.model.content[i]

    def _text(self, s: Serving, anime_id: int) -> str:
        """The synopsis explanations read (an added anime's own, else the catalogue's)."""
        if anime_id in s.extra:
            return s.extra[anime_id].text
        i = s.model.pos.get(anime_id)
        return "" if i is None else s.model.synopses[i]

    def _anchor(self, s: Serving, anime_id: int) -> Anchor:
        if anime_id in s.extra:
            p = s.extra[anime_id].payload
            return Anchor(anime_id, p.get("title", ""), s.extra[anime_id].content, p.get("genres", []),
                          s.extra[anime_id].text)
        i = s.model.pos[anime_id]
        return Anchor(anime_id, s.model.titles[i], s.model.content[i], s.model.genres[i], s.model.synopses[i])

    def _subject(self, s: Serving, c: Candidate) -> Subject:
        return Subject(c.anime_id, c.content, c.payload.get("genres") or [], self._text(s, c.anime_id),
                       int(c.payload.get("members") or 0))

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
        s = self.serving()
        if not request.liked_ids:
            raise invalid_argument({"liked_ids": "give at least one liked anime"})
        liked = self._known_ids(s, request.liked_ids, "liked_ids")
        disliked = self._known_ids(s, request.disliked_ids, "disliked_ids")
        weights = list(request.liked_weights)
        if weights and len(weights) != len(liked):
            raise invalid_argument({"liked_weights": f"{len(weights)} weights for {len(liked)} liked ids"})
        bad = [(f"liked_weights[{j}]", f"must be in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {w:.3g}")
               for j, w in enumerate(weights)
               if not np.float32(MIN_WEIGHT) <= w <= MAX_WEIGHT]   # as float32, as sent; NaN fails too
        if bad:
            raise invalid_argument(bad[:10])
        excluded = set(disliked) | (set() if request.options.filters.include_liked else set(liked))
        dis = np.stack([self._content(s, a) for a in disliked]) if disliked else None
        return self._page(request, context, s, request.options, query_kind="favourites",
                          vector_fn=lambda s: s.model.favourites_vector(liked, weights, s.extra),
                          wmf_fn=lambda s: s.model.wmf_scores_favourites(liked, weights),
                          excluded=excluded, anchors=[self._anchor(s, a) for a in liked[:20]], dislikes=dis,
                          wmf_refused=wmf_refusal(s, liked))

    def RecommendForUser(self, request, context):
        s = self.serving()
        uid = int(request.user_id)
        try:
            online = self.users.get(s, uid) if uid > 0 else None
        except IndexUnavailable as e:
            # no users collection: a training user still gets their trained vector; a user known
            # only through feedback cannot be served right now
            log.warning("users collection unavailable: %s", e)
            online = None
            if uid not in s.model.user_pos and self.feedback.has_user(uid):
                raise unavailable("the users collection cannot be reached", reason="USERS_UNAVAILABLE",
                                  retry_after_s=2.0) from None
        if online is not None:
            return self._online_user_page(request, context, s, online)
        u = s.model.user_pos.get(uid)
        if u is None:
            raise not_found("user", str(request.user_id), reason="USER_NOT_FOUND", field="user_id")
        h = s.model.train[u]
        history = [int(s.model.item_ids[i]) for i in h.indices]
        top = [int(s.model.item_ids[i]) for i in h.indices[np.argsort(-h.data, kind="stable")[:10]]]
        excluded = set() if request.options.filters.include_liked else set(history)
        return self._page(request, context, s, request.options, query_kind="user",
                          vector_fn=lambda s: s.model.user_vector(int(request.user_id)),
                          wmf_fn=lambda s: s.model.wmf_scores_user(int(request.user_id)),
                          excluded=excluded, anchors=[self._anchor(s, a) for a in top])

    def _online_user_page(self, request, context, s: Serving, online):
        """A user updated by feedback: their stored vector; their whole list (history and
        feedback, liked or not) is never recommended back, the liked part is with include_liked."""
        liked = online.liked
        listed = set(online.listed)
        excluded = (listed - set(liked)) if request.options.filters.include_liked else listed
        top = [a for a, _ in sorted(liked.items(), key=lambda p: -p[1])
               if a in s.model.pos or a in s.extra][:10]
        return self._page(request, context, s, request.options, query_kind="user",
                          vector_fn=lambda s: online.vector,
                          wmf_fn=lambda s: wmf_scores(s.model, online.listed),
                          excluded=excluded, anchors=[self._anchor(s, a) for a in top])

    def RecordFeedback(self, request, context):
        s = self.serving()
        events = self._feedback_events(s, request.events)
        try:
            result, updated = self.users.record(s, events)
        except ValueError as e:
            if isinstance(e, FeedbackConflict):
                i, eid = e.conflicts[0]
                raise already_exists(f"event_id {eid!r} was already used for a different event; nothing recorded",
                                     reason="EVENT_ID_REUSED", field=f"events[{i}].event_id") from None
            where, _, problem = str(e).partition(": ")   # the store's own check: "events[i].<field>: <problem>"
            raise invalid_argument({where: problem or str(e)}) from None
        log.info("feedback recorded", extra={"applied": result.applied, "duplicates": result.duplicates,
                                             "users": len(updated), "version": s.version})
        return ranker_pb2.FeedbackResult(applied=result.applied, duplicates=result.duplicates,
                                         updated_user_ids=updated, model_version=s.version)

    def _feedback_events(self, s: Serving, raw) -> list[FeedbackEvent]:
        """Validate a batch (every problem, by field path) into store events."""
        if not raw:
            raise invalid_argument({"events": "give at least one event"})
        if len(raw) > self.settings.max_feedback_events:
            raise invalid_argument({"events": f"at most {self.settings.max_feedback_events} events per call, "
                                              f"got {len(raw)}: split the batch"})
        bad, out = [], []
        for i, e in enumerate(raw):
            kind = FEEDBACK_KINDS.get(e.kind)
            problems = feedback_problems(e, kind)
            if e.anime_id <= 0:
                problems.append(("anime_id", "must be > 0"))
            bad += [(f"events[{i}].{f}", d) for f, d in problems]
            if not problems:
                out.append(FeedbackEvent(e.event_id, int(e.user_id), int(e.anime_id), kind, e.score or None,
                                         occurred_at_seconds(e)))
        if bad:
            raise invalid_argument(bad)
        for i, e in enumerate(out):
            if e.anime_id not in s.model.pos and e.anime_id not in s.extra:
                raise not_found("anime", str(e.anime_id), reason="ANIME_NOT_FOUND", field=f"events[{i}].anime_id")
        return out

    def SimilarItems(self, request, context):
        s = self.serving()
        (aid,) = self._known_ids(s, [request.anime_id], "anime_id")
        return self._page(request, context, s, request.options, query_kind="similar",
                          vector_fn=lambda s: s.model.favourites_vector([aid], None, s.extra),
                          wmf_fn=lambda s: s.model.wmf_scores_favourites([aid], None),
                          excluded={aid}, anchors=[self._anchor(s, aid)], wmf_refused=wmf_refusal(s, [aid]))

    def RecommendFromVector(self, request, context):
        s = self.serving()
        m = s.model
        dim = int(m.manifest["encoder"]["dim"])
        vec = np.asarray(request.content_vector, np.float32)
        if len(vec) != dim:
            raise invalid_argument({"content_vector": f"length {len(vec)}, the model's encoder gives {dim}"})
        norm = float(np.linalg.norm(vec.astype(np.float64)))   # float64: no overflow for huge entries
        if not np.all(np.isfinite(vec)) or not MIN_VECTOR_NORM <= norm <= MAX_VECTOR_NORM:
            raise invalid_argument({"content_vector": f"must be finite with L2 norm in [{MIN_VECTOR_NORM:g}, "
                                                      f"{MAX_VECTOR_NORM:g}] (the encoder's vectors have norm 1), "
                                                      f"got {norm:.3g}"})
        fp = m.manifest["encoder"]["fingerprint"]
        if request.encoder_fingerprint and request.encoder_fingerprint != fp:
            raise failed_precondition(f"content vector from encoder {request.encoder_fingerprint[:40]!r}, model uses {fp}",
                                      reason="ENCODER_MISMATCH")
        if len(request.query_text) > MAX_SYNOPSIS:
            raise invalid_argument({"query_text": f"at most {MAX_SYNOPSIS} characters, got {len(request.query_text)}"})
        liked = self._known_ids(s, request.liked_ids, "liked_ids")
        excluded = set() if request.options.filters.include_liked else set(liked)
        w = m.whiten(vec)
        content = m.semantic_vector(None if w is None else w[0], m.tfidf_vector(request.query_text or None))
        return self._page(request, context, s, request.options, query_kind="text",
                          vector_fn=lambda s: s.model.text_vector(vec, request.query_text or None), wmf_fn=None, excluded=excluded,
                          anchors=[self._anchor(s, a) for a in liked[:20]], query_content=content,
                          query_text=request.query_text)

    def UpsertAnime(self, request, context):
        s = self.serving()
        fields = validate_anime_input(request.anime)
        text = anime_text(s.model, fields)
        raw, fingerprint = self.encoder.encode([text])
        if fingerprint != s.model.manifest["encoder"]["fingerprint"]:
            raise failed_precondition(f"encoder serves {fingerprint}, model {s.version} was trained with "
                                      f"{s.model.manifest['encoder']['fingerprint']}", reason="ENCODER_MISMATCH")
        with self._upsert:   # the write and serving it are one step for this replica
            aid = self._upsert_id(s, request, context)   # None: a new anime, its id assigned by the store
            if aid in s.model.pos and not fields["members"]:
                fields["members"] = int(s.model.payload(s.model.pos[aid])["members"])
            vec, content, tfidf, cold, row = self._item_vectors(s, aid or 0, raw[0], text, fields)
            if aid is None:   # id assignment and the write are one step in the store, across replicas too
                try:
                    written = self.store.add_new(fields, raw[0], fingerprint, self._top_assigned(s))
                except IdsExhausted as e:
                    raise resource_exhausted(str(e), reason="ANIME_IDS_EXHAUSTED") from None
                aid = written.anime_id
            else:
                written = self.store.put(aid, fields, raw[0], fingerprint)
            created = written.created and aid not in s.model.pos
            meta = ItemMeta(aid, content, payload_from_fields(aid, fields, cold), tfidf, fields["synopsis"], row)
            self.index.upsert([ItemPoint(aid, vec, meta.payload)], version=s.version)
            s.extra[aid] = meta
            s.applied[aid] = written.revision
            s.generation += 1
        log.info("upserted anime", extra={"anime_id": aid, "new": created, "version": s.version})
        return ranker_pb2.UpsertAnimeResponse(anime_id=aid, created=created, model_version=s.version)

    @staticmethod
    def _top_assigned(s: Serving) -> int:
        """The largest bundle id inside ASSIGNED_IDS (0: none): new ids go above it."""
        ids = s.model.item_ids
        in_range = ids[(ids >= ASSIGNED_IDS.start) & (ids < ASSIGNED_IDS.stop)]
        return int(in_range.max()) if len(in_range) else 0

    def _upsert_id(self, s: Serving, request, context) -> int | None:
        """The id an UpsertAnime writes. Absent: None (the store assigns a fresh one from
        ASSIGNED_IDS, above _top_assigned). Given: it must be in
        1..MAX_ANIME_ID and outside ASSIGNED_IDS unless it names an anime added before (callers
        never create ids there, so assigned ids never collide); a catalogue anime is replaced only
        with the REPLACE_CATALOGUE_KEY metadata naming it."""
        if not request.HasField("anime_id"):
            return None
        aid = int(request.anime_id)
        if not 1 <= aid <= MAX_ANIME_ID:
            raise invalid_argument({"anime_id": f"must be in 1..{MAX_ANIME_ID}, got {aid}"})
        if aid in s.model.pos:
            asked = dict(context.invocation_metadata() if context else ()).get(REPLACE_CATALOGUE_KEY)
            if asked != str(aid):
                raise already_exists(
                    f"anime_id {aid} is a catalogue anime of {s.version}; replacing its title and text takes "
                    f"metadata {REPLACE_CATALOGUE_KEY}: {aid}", reason="CATALOGUE_ANIME", field="anime_id")
        elif aid in ASSIGNED_IDS and not self.store.has(aid):
            raise invalid_argument({"anime_id": f"ids from {ASSIGNED_IDS.start} on are assigned by the ranker: "
                                                f"omit anime_id to add a new anime"})
        return aid

    def _item_vectors(self, s: Serving, aid: int, raw: np.ndarray, text: str, fields: dict):
        """(serving vector, whitened content, TF-IDF projection, cold, content row) for an added
        anime; a catalogue anime keeps its audience (its collaborative vector and group)."""
        m = s.model
        if not m.has_vectors:
            raise unavailable(f"model {s.version} has no item vectors; cannot add anime", reason="NO_ITEM_TOWER")
        tfidf = m.tfidf_vector(text)
        w = m.whiten(raw)
        minilm = None if w is None else w[0]
        content = m.semantic_vector(minilm, tfidf)
        row = m.content_row(minilm, tfidf, fields)
        i = m.pos.get(aid)
        return m.item_vector(row, i), content, tfidf, i is None or not m.warm[i], row

    def GetModelInfo(self, request, context):
        s = self.serving()
        info = model_info(s)
        info.next_model = next_model_status(self.settings.next_model_file)
        return common_pb2.GetModelInfoResponse(model=info, limits=self.settings.limits.to_proto())

    def ListCatalog(self, request, context):
        s = self.serving()
        size = request.page_size or 1000
        if not 0 < size <= 5000:
            raise invalid_argument({"page_size": f"must be in 1..5000 (0 means 1000), got {request.page_size}"})
        digest = request_digest(ranker_pb2.ListCatalogRequest(), s.version)
        offset = decode_page_token(request.page_token, digest, field="page_token")
        entries = s.catalog()
        page = entries[offset: offset + size]
        more = offset + size < len(entries)
        return ranker_pb2.ListCatalogResponse(entries=page, model_version=s.version,
                                              next_page_token=encode_page_token(offset + size, digest) if more else "")


def model_info(s: Serving) -> common_pb2.ModelInfo:
    m = s.model.manifest
    info = S.ModelInfo(version=s.version, encoder_name=m["encoder"]["name"], encoder_dim=int(m["encoder"]["dim"]),
                       tower_dim=int(s.model.item_tower.shape[1]), n_items=len(s.model.item_ids) + len(
                           [a for a in s.extra if a not in s.model.pos]),
                       n_users=len(s.model.user_ids), encoder_fingerprint=m["encoder"]["fingerprint"],
                       data_fingerprint=m["data"]["fingerprint"], example_user_ids=s.example_users,
                       preset=m.get("preset", "full"))
    info.created_at.FromJsonString(m["created_at"])
    info.offline_metrics.update(offline_metrics(m))
    return info


def next_model_status(path: Path | None) -> str:
    """The `status` line of the trainer's report file (settings.next_model_file); "" when there is
    none or it cannot be read (a trainer rewrites it atomically; a half-read file is just skipped)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            status = json.loads(f.read(4096)).get("status", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return status[:300] if isinstance(status, str) else ""


def offline_metrics(manifest: dict) -> dict[str, float]:
    return {f"{sc}/{k}": float(v) for sc, vals in (manifest.get("metrics") or {}).items() for k, v in vals.items()}


def validate_anime_input(a: common_pb2.AnimeInput) -> dict:
    bad = []
    if not a.title.strip():
        bad.append(("anime.title", "required"))
    elif len(a.title) > MAX_TITLE:
        bad.append(("anime.title", f"at most {MAX_TITLE} characters"))
    if not a.synopsis.strip():
        bad.append(("anime.synopsis", "required: a new anime is recommendable only through its text"))
    elif len(a.synopsis) > MAX_SYNOPSIS:
        bad.append(("anime.synopsis", f"at most {MAX_SYNOPSIS} characters, got {len(a.synopsis)}"))
    if len(a.genres) > MAX_GENRES or any(not g.strip() or len(g) > 50 for g in a.genres):
        bad.append(("anime.genres", f"at most {MAX_GENRES} genres of 1-50 characters"))
    if len(a.synonyms) > 50 or any(len(x) > MAX_TITLE for x in a.synonyms):
        bad.append(("anime.synonyms", f"at most 50 synonyms of up to {MAX_TITLE} characters"))
    if a.type and a.type not in TYPES:
        bad.append(("anime.type", f"one of {', '.join(TYPES)} or empty"))
    if a.HasField("year") and not 1900 <= a.year <= 2100:
        bad.append(("anime.year", "must be in 1900..2100"))
    if a.HasField("episodes") and not 0 <= a.episodes <= MAX_EPISODES:
        bad.append(("anime.episodes", f"must be in 0..{MAX_EPISODES}, got {a.episodes}"))
    if a.members < 0:
        bad.append(("anime.members", "must be >= 0"))
    if bad:
        raise invalid_argument(bad)
    return {"title": a.title.strip(), "title_english": a.title_english.strip(), "synonyms": list(a.synonyms),
            "synopsis": a.synopsis.strip(), "genres": [g.strip() for g in a.genres], "type": a.type,
            "year": a.year if a.HasField("year") else None,
            "episodes": a.episodes if a.HasField("episodes") else None, "members": int(a.members)}


def _bundle_files(path: Path) -> tuple:
    """(relative path, size, mtime) of every file of a bundle directory: changes when it is
    replaced or repaired. () when there is no such directory."""
    if not path.is_dir():
        return ()
    return tuple(sorted((str(p.relative_to(path)), st.st_size, st.st_mtime_ns)
                        for p in path.rglob("*") if p.is_file() for st in [p.stat()]))


def pick_bundles(settings: RankerSettings, index: ItemIndex) -> list[Path]:
    """The bundle to serve first: [explicit setting], else [the alias target], else every bundle,
    newest first (the ranker serves the first that verifies)."""
    store = settings.model_store
    if settings.bundle:
        return [Path(settings.bundle) if Path(settings.bundle).is_absolute() else store / settings.bundle]
    target = index.alias_target()
    if target and (store / target).is_dir():
        return [store / target]
    found = list_bundles(store)
    if not found:
        raise SystemExit(f"no model bundle in {store}: train one with `make train` (or `anime2vec train --sample`)")
    return found[::-1]


def catalog_entries(s: Serving) -> list[ranker_pb2.CatalogEntry]:
    """Bundle catalogue then added anime (by id); an added anime that replaces a catalogue
    entry's text keeps its catalogue position."""
    cat = s.model.catalog
    out = []
    for i in range(len(cat)):
        row = cat.iloc[i]
        aid = int(s.model.item_ids[i])
        if aid in s.extra:
            out.append(_entry_from_payload(aid, s.extra[aid].payload, s.extra[aid]))
            continue
        e = ranker_pb2.CatalogEntry(anime_id=aid, title=str(row["title"]), title_english=str(row.get("title_english") or ""),
                                    title_japanese=str(row.get("title_japanese") or ""),
                                    synonyms=[str(x) for x in (row.get("synonyms") or [])], members=int(row.get("members") or 0),
                                    type=str(row.get("type") or ""), genres=[str(g) for g in (row.get("genres") or [])])
        if not pd.isna(row.get("year")):
            e.year = int(row["year"])
        out.append(e)
    for aid in sorted(a for a in s.extra if a not in s.model.pos):
        out.append(_entry_from_payload(aid, s.extra[aid].payload, s.extra[aid]))
    return out


def _entry_from_payload(aid: int, p: dict, meta: ItemMeta) -> ranker_pb2.CatalogEntry:
    e = ranker_pb2.CatalogEntry(anime_id=aid, title=p.get("title", ""), title_english=p.get("title_english", ""),
                                synonyms=p.get("synonyms", []), members=int(p.get("members") or 0),
                                type=p.get("type") or "", genres=p.get("genres") or [])
    if p.get("year") is not None:
        e.year = int(p["year"])
    return e

"""RankerService: one request from validated options to a ranked page.

    request → validate → query vector (by strategy, with fallback) → candidates
      (Qdrant search with payload filters for DropoutNet; in-memory for WMF / popularity)
      → optional re-rank (diversity, dislikes) → page → explanations
The served model is swapped atomically (`self._serving`): a request keeps the version it
started with, so a promotion never fails or mixes a request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from anime2vec.bundle import list_bundles, load_bundle
from anime2vec.data.text import build_texts
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.errors import ServiceError, failed_precondition, invalid_argument, not_found, unavailable
from anime2vec.serving.metrics import Metrics, set_model_info
from anime2vec.serving.pagination import decode_page_token, encode_page_token, request_digest
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc

from .added_anime import AddedAnimeStore
from .index import ItemIndex, ItemPoint, SearchFilter
from .model import ItemMeta, ServingModel
from .ranking import Candidate, CatalogueFilter, explain, mmr, search_filter, validate_options
from .settings import RankerSettings

log = logging.getLogger(__name__)
S = common_pb2
NEW_ID_BASE = 100_000_000          # ids assigned to added anime: far above MAL's
MAX_TITLE, MAX_SYNOPSIS, MAX_GENRES = 300, 20_000, 30
MAX_WEIGHT = 100.0                 # liked_weights upper bound
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
                           list(cat["type"]), [None if pd.isna(y) else int(y) for y in cat["year"]])
    return Serving(model, filt, {})


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
                 metrics: Metrics, encoder: EncoderClient | None = None):
        self.settings, self.index, self.store, self.metrics = settings, index, store, metrics
        self.encoder = encoder or EncoderClient(settings.encoder_address, settings.encoder_timeout_s)
        self._serving: Serving | None = None
        self._swap = threading.Lock()
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
            self._serving = serving
        set_model_info(self.metrics, "ranker", model.version, model.manifest["encoder"]["name"],
                       int(model.item_tower.shape[1]), offline_metrics(model.manifest))
        log.info("serving model %s", model.version)

    def _replay_added(self, serving: Serving) -> None:
        m, points = serving.model, []
        added = self.store.all()
        if added and m.dropoutnet is None:   # no item tower to embed them: serve the rest, keep them stored
            log.warning("model %s has no item tower: %d added anime are not served by it", m.version, len(added))
            return
        for a in added:
            if a.encoder_fingerprint != m.manifest["encoder"]["fingerprint"]:
                log.warning("added anime %d was encoded by %s, model %s uses %s: skipped until re-added",
                            a.anime_id, a.encoder_fingerprint, m.version, m.manifest["encoder"]["fingerprint"])
                continue
            vec, content, tfidf, cold = self._item_vectors(serving, a.anime_id, a.raw_vector,
                                                           anime_text(m, a.fields))
            serving.extra[a.anime_id] = ItemMeta(a.anime_id, content, payload_from_fields(a.anime_id, a.fields, cold),
                                                 tfidf)
            points.append(ItemPoint(a.anime_id, vec, serving.extra[a.anime_id].payload))
        if points:
            self.index.upsert(points, version=m.version)
            log.info("replayed %d added anime into %s", len(points), m.version)

    def serving(self) -> Serving:
        s = self._serving
        if s is None:
            raise unavailable("no model loaded yet", reason="MODEL_NOT_LOADED", retry_after_s=2.0)
        return s

    def maybe_follow_alias(self) -> None:
        """Called periodically: load and serve the version the alias points to, if it moved."""
        target = self.index.alias_target()
        current = self._serving.version if self._serving else None
        if not target or target == current:
            return
        path = self.settings.model_store / target
        if not path.is_dir():
            log.error("alias points to %s but no such bundle in %s; still serving %s", target,
                      self.settings.model_store, current)
            return
        try:
            self.activate(ServingModel(load_bundle(path), device=self.settings.device or None))
        except Exception:
            log.exception("could not switch to %s; still serving %s", target, current)

    # ---- shared request path ---------------------------------------------------------
    def _page(self, request, context, s: Serving, opts, *, query_kind: str,
              vector_fn, wmf_fn, excluded: set[int], anchors: list, dislikes: np.ndarray | None = None,
              query_content: np.ndarray | None = None) -> ranker_pb2.RankedList:
        limit, diversity = validate_options(opts, self.settings.default_limit, self.settings.max_limit,
                                            self.settings.max_ids)
        offset = decode_page_token(opts.page_token, request_digest(request, s.version))
        flt = search_filter(opts.filters, excluded)
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
                if not s.model.has_dropoutnet:
                    reasons.append("this model has no DropoutNet weights")
                    continue
                vec = vector_fn(s)
                if vec is None:
                    reasons.append("DropoutNet cannot build a query vector for this request")
                    continue
                pool = self.settings.rerank_pool if rerank else need
                hits = self.index.search(vec, limit=pool if rerank else need - offset, offset=0 if rerank else offset,
                                         flt=flt, version=s.version)
                cands = [Candidate(h.anime_id, h.score, h.payload, self._content(s, h.anime_id)) for h in hits]
                if not rerank:
                    cands = [None] * offset + cands   # align with absolute positions
                break
            scores = None
            if strategy == S.STRATEGY_WMF:
                scores = wmf_fn(s) if wmf_fn else None
                if scores is None:
                    reasons.append("WMF cannot serve this request (no interactions to fold in)")
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
                                 + (f" + mmr({diversity:g})" if diversity > 0 else "")))
        kind = {S.STRATEGY_WMF: "wmf", S.STRATEGY_POPULARITY: "popularity"}.get(served, query_kind)
        for rank, c in enumerate(page, start=offset + 1):
            p = c.payload
            rec = resp.recommendations.add(anime_id=c.anime_id, title=p.get("title", ""), score=c.score,
                                           genres=p.get("genres") or [], type=p.get("type") or "", rank=rank,
                                           members=int(p.get("members") or 0), cold_start=bool(p.get("cold")))
            if p.get("year") is not None:
                rec.year = int(p["year"])
            if opts.explain:
                rec.reasons.extend(explain(c, anchors, kind, query_content))
        return resp

    def _content(self, s: Serving, anime_id: int) -> np.ndarray | None:
        if anime_id in s.extra:
            return s.extra[anime_id].content
        i = s.model.pos.get(anime_id)
        return None if i is None else s.model.content[i]

    def _anchor(self, s: Serving, anime_id: int):
        if anime_id in s.extra:
            p = s.extra[anime_id].payload
            return (anime_id, p.get("title", ""), s.extra[anime_id].content, p.get("genres", []))
        i = s.model.pos[anime_id]
        row = s.model.catalog.iloc[i]
        return (anime_id, str(row["title"]), s.model.content[i], list(row["genres"] or []))

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
        if any(not np.isfinite(w) or w <= 0 or w > MAX_WEIGHT for w in weights):
            # confidences are 0.5-5 in training; huge ones make the ALS fold-in ill-conditioned
            raise invalid_argument({"liked_weights": f"each weight must be in (0, {MAX_WEIGHT:g}]"})
        excluded = set(disliked) | (set() if request.options.filters.include_liked else set(liked))
        dis = np.stack([self._content(s, a) for a in disliked]) if disliked else None
        return self._page(request, context, s, request.options, query_kind="favourites",
                          vector_fn=lambda s: s.model.favourites_vector(liked, weights, s.extra),
                          wmf_fn=lambda s: s.model.wmf_scores_favourites(liked, weights),
                          excluded=excluded, anchors=[self._anchor(s, a) for a in liked[:20]], dislikes=dis)

    def RecommendForUser(self, request, context):
        s = self.serving()
        u = s.model.user_pos.get(int(request.user_id))
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

    def SimilarItems(self, request, context):
        s = self.serving()
        (aid,) = self._known_ids(s, [request.anime_id], "anime_id")
        return self._page(request, context, s, request.options, query_kind="favourites",
                          vector_fn=lambda s: s.model.favourites_vector([aid], None, s.extra),
                          wmf_fn=lambda s: s.model.wmf_scores_favourites([aid], None),
                          excluded={aid}, anchors=[self._anchor(s, aid)])

    def RecommendFromVector(self, request, context):
        s = self.serving()
        m = s.model
        dim = int(m.manifest["encoder"]["dim"])
        vec = np.asarray(request.content_vector, np.float32)
        if len(vec) != dim:
            raise invalid_argument({"content_vector": f"length {len(vec)}, the model's encoder gives {dim}"})
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise invalid_argument({"content_vector": "must be finite and non-zero"})
        fp = m.manifest["encoder"]["fingerprint"]
        if request.encoder_fingerprint and request.encoder_fingerprint != fp:
            raise failed_precondition(f"content vector from encoder {request.encoder_fingerprint[:40]!r}, model uses {fp}",
                                      reason="ENCODER_MISMATCH")
        liked = self._known_ids(s, request.liked_ids, "liked_ids")
        excluded = set() if request.options.filters.include_liked else set(liked)
        content = m.whiten(vec)[0]
        return self._page(request, context, s, request.options, query_kind="text",
                          vector_fn=lambda s: s.model.text_vector(vec), wmf_fn=None, excluded=excluded,
                          anchors=[self._anchor(s, a) for a in liked[:20]], query_content=content)

    def UpsertAnime(self, request, context):
        s = self.serving()
        fields = validate_anime_input(request.anime)
        text = anime_text(s.model, fields)
        raw, fingerprint = self.encoder.encode([text])
        if fingerprint != s.model.manifest["encoder"]["fingerprint"]:
            raise failed_precondition(f"encoder serves {fingerprint}, model {s.version} was trained with "
                                      f"{s.model.manifest['encoder']['fingerprint']}", reason="ENCODER_MISMATCH")
        with self._upsert:   # id assignment and the write are one step
            if request.HasField("anime_id"):
                if request.anime_id <= 0:
                    raise invalid_argument({"anime_id": "must be positive"})
                aid = int(request.anime_id)
            else:
                aid = max(NEW_ID_BASE, int(s.model.item_ids.max()) + 1, self.store.max_id() + 1)
            if aid in s.model.pos and not fields["members"]:
                fields["members"] = int(s.model.payload(s.model.pos[aid])["members"])
            vec, content, tfidf, cold = self._item_vectors(s, aid, raw[0], text)
            created = self.store.put(aid, fields, raw[0], fingerprint) and aid not in s.model.pos
            meta = ItemMeta(aid, content, payload_from_fields(aid, fields, cold), tfidf)
            self.index.upsert([ItemPoint(aid, vec, meta.payload)], version=s.version)
            s.extra[aid] = meta
            s.generation += 1
        log.info("upserted anime", extra={"anime_id": aid, "new": created, "version": s.version})
        return ranker_pb2.UpsertAnimeResponse(anime_id=aid, created=created, model_version=s.version)

    def _item_vectors(self, s: Serving, aid: int, raw: np.ndarray, text: str):
        """(serving vector, whitened content, TF-IDF projection, cold) for an added anime; a
        catalogue anime keeps its WMF factors."""
        m = s.model
        content = m.whiten(raw)[0]
        tfidf = m.tfidf_vector(text)
        i = m.pos.get(aid)
        pref = m.wmf.V[i] if i is not None and m.warm[i] else None
        if m.dropoutnet is None:
            raise unavailable(f"model {s.version} has no item tower; cannot add anime", reason="NO_ITEM_TOWER")
        return m.item_vector(pref, content, tfidf), content, tfidf, pref is None

    def GetModelInfo(self, request, context):
        s = self.serving()
        return common_pb2.GetModelInfoResponse(model=model_info(s))

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
                       data_fingerprint=m["data"]["fingerprint"])
    info.created_at.FromJsonString(m["created_at"])
    info.offline_metrics.update(offline_metrics(m))
    return info


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
    if a.members < 0:
        bad.append(("anime.members", "must be >= 0"))
    if bad:
        raise invalid_argument(bad)
    return {"title": a.title.strip(), "title_english": a.title_english.strip(), "synonyms": list(a.synonyms),
            "synopsis": a.synopsis.strip(), "genres": [g.strip() for g in a.genres], "type": a.type,
            "year": a.year if a.HasField("year") else None,
            "episodes": a.episodes if a.HasField("episodes") else None, "members": int(a.members)}


def pick_bundle(settings: RankerSettings, index: ItemIndex):
    """The bundle to serve first: explicit setting, else the alias target, else the newest."""
    store = settings.model_store
    if settings.bundle:
        return Path(settings.bundle) if Path(settings.bundle).is_absolute() else store / settings.bundle
    target = index.alias_target()
    if target and (store / target).is_dir():
        return store / target
    found = list_bundles(store)
    if not found:
        raise SystemExit(f"no model bundle in {store}: train one with `make train` (or `anime2vec train --sample`)")
    return found[-1]


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

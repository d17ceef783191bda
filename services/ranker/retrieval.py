"""The ranker's request path after a handler has checked its ids: options → page → candidates → re-rank
→ response. One `Query` says what a request kind contributes (how to build its query vector, its WMF
scores, what it excludes, what explanations are anchored on); `Retriever.page` does the rest the same
way for every kind:

    options (limit, diversity) and the page token → the page (offset, limit) and how deep to fetch
    strategy chain: DropoutNet/hybrid query vector → the exact search under the filter, over the served
      vectors in memory (memory_scan.py; Qdrant's search when that is off or in the quantized mode); else
      WMF scores, else popularity, ranked in memory with the same filter (CatalogueFilter)
    re-rank (diversity by MMR, dislikes) over a fixed pool, so pages never repeat
    the page's recommendations, explanations when asked, the next page token
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import error_details_pb2

from anime2vec.index.base import ItemIndex, SearchFilter
from anime2vec.serving.errors import DOMAIN, ServiceError
from anime2vec.serving.metrics import Metrics
from anime2vec.serving.pagination import decode_page_token, encode_page_token, request_digest
from anime2vec.v1 import common_pb2, ranker_pb2

from .explanations import Anchor, explain
from .memory_scan import Block, ScanHit
from .ranking import Candidate, mmr, reranked, search_filter, validate_options
from .settings import RankerSettings
from .state import Serving, content_of, has_cold, subject_of

S = common_pb2


@dataclass
class Query:
    """What one request kind contributes to a page."""

    kind: str  # favourites | user | similar | text
    vector_fn: Callable[[Serving], np.ndarray | None]  # the hybrid/DropoutNet query vector
    wmf_fn: Callable[[Serving], np.ndarray | None] | None  # WMF scores over the bundle's items
    excluded: set[int]  # never recommended back
    anchors: list[Anchor] = field(default_factory=list)  # what explanations point at
    dislikes: np.ndarray | None = None  # content rows of disliked anime
    query_content: np.ndarray | None = None  # free text: its content vector
    query_text: str = ""
    wmf_refused: str = "WMF cannot serve this request (no interactions to fold in)"


@dataclass(frozen=True)
class Page:
    """The page arithmetic, done once: which absolute positions a request wants and how deep to fetch."""

    offset: int
    limit: int
    diversity: float
    rerank: bool
    pool: int  # how many candidates a re-rank orders (settings.rerank_pool)
    digest: str  # the request's (pagination.request_digest): taken once, for the token read and the one issued

    @property
    def need(self) -> int:
        """Positions 0..need-1: the page and one more, to know whether a next page exists."""
        return self.offset + self.limit + 1

    @property
    def fetch(self) -> int:
        """How many ranked candidates from the top: the whole re-rank pool, or the page and one more."""
        return self.pool if self.rerank else self.need


# Why a cold_start_only request skips WMF (ServedBy.degraded_reason): it goes to popularity among
# the cold anime instead.
WMF_COLD_REFUSAL = (
    "WMF cannot serve cold_start_only: it has no factors for anime without interactions (used popularity among them)"
)


def cold_unanswerable(s: Serving) -> ServiceError:
    """INVALID_ARGUMENT, reason FILTER_UNANSWERABLE (as the gateway's catalogue checks): a
    cold_start_only filter when the served version has no cold anime at all."""
    field = "options.filters.cold_start_only"
    why = (
        f"model {s.version} has interactions for every anime it serves and none was added since, so "
        "a cold_start_only filter matches nothing: leave it out"
    )
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field}: {why}",
        [
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=why)]
            ),
            error_details_pb2.ErrorInfo(reason="FILTER_UNANSWERABLE", domain=DOMAIN),
        ],
    )


def wmf_refusal(s: Serving, liked: list[int]) -> str:
    """Why WMF cannot fold in these favourites: none of them has factors in the model."""

    def why(a: int) -> str:
        title = s.extra[a].payload.get("title", "") if a in s.extra else s.model.titles[s.model.pos[a]]
        return f"{title or a}: " + (
            "its ratings were held out of this model's training"
            if a in s.held_out
            else "no ratings in the training data"
        )

    named = "; ".join(why(a) for a in liked[:3]) + ("; ..." if len(liked) > 3 else "")
    return f"WMF cannot serve this request: none of its anime has interactions in the model ({named})"


def _payload(s: Serving, h: ScanHit) -> dict:
    if h.added is not None:
        return h.added.payload
    assert h.row is not None  # a bundle anime
    return s.model.payload(h.row)


class Retriever:
    def __init__(self, settings: RankerSettings, index: ItemIndex, metrics: Metrics):
        self.settings, self.index, self.metrics = settings, index, metrics

    def page(self, request, s: Serving, opts: common_pb2.RecommendOptions, q: Query) -> ranker_pb2.RankedList:
        page = self._page_of(request, s, opts, q)
        flt = search_filter(opts.filters, q.excluded)
        if flt.cold_only and not has_cold(s):
            raise cold_unanswerable(s)
        requested = (
            opts.strategy if opts.strategy not in (S.STRATEGY_UNSPECIFIED, S.STRATEGY_AUTO) else S.STRATEGY_DROPOUTNET
        )
        if page.need > self.settings.max_page_depth or (page.rerank and page.offset >= self.settings.rerank_pool):
            return ranker_pb2.RankedList(served_by=S.ServedBy(strategy=requested, model_version=s.version))
        cands, served, reasons = self._candidates(s, q, page, flt, requested)
        for r in reasons:
            self.metrics.fallbacks.labels(service="ranker", reason=r).inc()
        ranked: Sequence[Candidate | None] = cands
        if page.rerank:  # fetched from position 0 (see _candidates): no None placeholders to drop
            ranked = mmr([c for c in cands if c is not None], page.diversity, q.dislikes)
        return self._response(s, opts, q, page, ranked, served, reasons)

    def _page_of(self, request, s: Serving, opts: common_pb2.RecommendOptions, q: Query) -> Page:
        limit, diversity = validate_options(
            opts, self.settings.default_limit, self.settings.max_limit, self.settings.max_ids
        )
        digest = request_digest(request, s.version)
        offset = decode_page_token(opts.page_token, digest)
        rerank = diversity > 0 or (q.dislikes is not None and len(q.dislikes) > 0)
        return Page(offset, limit, diversity, rerank, self.settings.rerank_pool, digest)

    def _candidates(
        self, s: Serving, q: Query, page: Page, flt: SearchFilter, requested: common_pb2.Strategy
    ) -> tuple[list[Candidate | None], common_pb2.Strategy, list[str]]:
        """Ranked candidates at their absolute positions (None before `page.offset` when only the page
        was fetched), the strategy that served, and why the ones before it could not."""
        chain = {
            S.STRATEGY_DROPOUTNET: [S.STRATEGY_DROPOUTNET, S.STRATEGY_WMF, S.STRATEGY_POPULARITY],
            S.STRATEGY_WMF: [S.STRATEGY_WMF, S.STRATEGY_POPULARITY],
            S.STRATEGY_POPULARITY: [S.STRATEGY_POPULARITY],
        }[requested]
        reasons: list[str] = []
        served = requested
        for strategy in chain:
            served = strategy
            if strategy == S.STRATEGY_DROPOUTNET:
                if not s.model.has_vectors:
                    reasons.append("this model has no DropoutNet weights")
                    continue
                start = 0 if page.rerank else page.offset
                in_memory = self.settings.search_in_memory and self.settings.search_mode == "exact"
                block = s.scan.block(flt) if in_memory and s.scan is not None else None
                # an engine search: searches running meanwhile wait for ours, one batch
                with nullcontext() if block is not None else self.index.search_expected():
                    vec = q.vector_fn(s)
                    if vec is None:
                        reasons.append("DropoutNet cannot build a query vector for this request")
                        continue
                    if block is not None:  # scored in memory (memory_scan.py)
                        self.metrics.memory_searches.inc()
                        with self.metrics.memory_search.time():
                            found = self._scanned(s, block, vec, flt, page.fetch)
                        return [None] * start + found[start:], served, reasons
                    hits = self.index.search(
                        vec,
                        limit=page.fetch - start,
                        offset=start,
                        flt=flt,
                        version=s.version,
                        exact=self.settings.search_mode == "exact",
                        oversampling=self.settings.search_oversampling,
                    )
                cands = [Candidate(h.anime_id, h.score, h.payload, content_of(s, h.anime_id)) for h in hits]
                return [None] * start + cands, served, reasons  # aligned with absolute positions
            scores = None
            if strategy == S.STRATEGY_WMF:
                if flt.cold_only:  # every cold anime's WMF factors are zero: it would rank them all equal
                    reasons.append(WMF_COLD_REFUSAL)
                    continue
                scores = q.wmf_fn(s) if q.wmf_fn else None
                if scores is None:
                    reasons.append(q.wmf_refused)
                    continue
            else:
                scores = s.model.popularity
            idx = np.flatnonzero(s.filt.mask(flt))
            top = idx[np.argsort(-scores[idx], kind="stable")[: page.fetch]]
            return (
                [
                    Candidate(int(s.model.item_ids[i]), float(scores[i]), s.model.payload(i), s.model.content[i])
                    for i in top
                ],
                served,
                reasons,
            )
        return [], served, reasons  # popularity ends every chain: not reached

    @staticmethod
    def _scanned(s: Serving, block: Block, vec: np.ndarray, flt: SearchFilter, fetch: int) -> list[Candidate]:
        """The top `fetch` under `flt`, scored in memory over its block (memory_scan.py)."""
        assert s.scan is not None
        hits = s.scan.scan(block, vec, flt, fetch, dict(s.extra))  # dict(): one atomic copy against writers
        return [Candidate(h.anime_id, h.score, _payload(s, h), content_of(s, h.anime_id)) for h in hits]

    def _response(
        self,
        s: Serving,
        opts: common_pb2.RecommendOptions,
        q: Query,
        page: Page,
        cands: Sequence[Candidate | None],
        served: common_pb2.Strategy,
        reasons: list[str],
    ) -> ranker_pb2.RankedList:
        shown = [c for c in cands[page.offset : page.offset + page.limit] if c is not None]
        has_more = len(cands) > page.offset + page.limit
        resp = ranker_pb2.RankedList(
            next_page_token=encode_page_token(page.offset + page.limit, page.digest) if has_more else "",
            served_by=S.ServedBy(
                strategy=served,
                model_version=s.version,
                degraded=bool(reasons),
                degraded_reason="; ".join(reasons),
                scorer={
                    S.STRATEGY_DROPOUTNET: s.model.manifest.get("model", "dropoutnet"),
                    S.STRATEGY_WMF: "wmf",
                    S.STRATEGY_POPULARITY: "popularity",
                }[served]
                + (f" + mmr({page.diversity:g})" if page.diversity > 0 else ""),
                reranked=reranked(page.diversity, 0 if q.dislikes is None else len(q.dislikes)),
            ),
        )
        fallback = {S.STRATEGY_WMF: "wmf", S.STRATEGY_POPULARITY: "popularity"}.get(served)
        for rank, c in enumerate(shown, start=page.offset + 1):
            p = c.payload
            text_only, held = bool(p.get("cold")), c.anime_id in s.held_out
            rec = resp.recommendations.add(
                anime_id=c.anime_id,
                title=p.get("title", ""),
                score=c.score,
                genres=p.get("genres") or [],
                type=p.get("type") or "",
                rank=rank,
                members=int(p.get("members") or 0),
                cold_start=text_only and not held,
                held_out=text_only and held,
            )
            if p.get("year") is not None:
                rec.year = int(p["year"])
            if opts.explain:
                why, rec.explanation = explain(
                    subject_of(s, c),
                    q.anchors,
                    q.kind,
                    fallback=fallback,
                    terms=s.terms,
                    query_content=q.query_content,
                    query_text=q.query_text,
                )
                rec.reasons.extend(why)
        return resp

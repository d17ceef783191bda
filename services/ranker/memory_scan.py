"""Exact searches answered in memory: the served vectors times the query vector.

The embedded Qdrant engine scans the float32 vectors point by point with the GIL held (5.4-5.9 ms per
unfiltered query on the full catalogue, 1.5x a one-thread numpy product: bench/search.py), and checks
a filter through its payload index one point at a time (~3x slower than numpy over just the matching
rows). Here the vectors are the ones the bundle indexed (`ServingModel.item_tower`) and, for anime
added at run time, the ones written to Qdrant with them (`ItemMeta.vector`), so the ranking is the
exact search's. Qdrant stays the store of record (collections per version, the alias, added anime)
and answers when this is turned off (A2V_RANKER_SEARCH_IN_MEMORY=false) or the quantized mode is on.

Blocks: an unfiltered search scores every row; a filter that keeps at most MAX_FRACTION of the
catalogue gets its matching rows' vectors copied together (cached per filter, least recently used
dropped), a broader one scores every row and keeps its matching rows.

One matrix-vector product per search, never a batched product: BLAS releases the GIL, so concurrent
searches already run on every core, and a batch (GEMM) sums in another order than a lone query
(GEMV), so a query's scores, and the order of near-ties across the pages of a list, would depend on
what else was being searched at the time. (Batching would read the vectors once for many queries,
but packing them costs 2.5 lone queries: bench numbers in docs/benchmarks.md.)

Every search ends the same way: the candidate rows are scored again in float64, row by row
(`native_scan.row_scores`: one fixed order of sums per row, compiled where the package's scan library
was built, else numpy's), and ordered by (score, anime id). A float32 BLAS product's last bits depend
on a row's position in the matrix it is part of, so without this two searches could order exact or near ties
differently, and page 2 of a list could repeat an anime of page 1. The candidates are every row whose
float32 score comes within the product's own error bound of the k-th best (float32), or of the int8
scan's bound (int8), so both precisions return the same page.

Precision (A2V_RANKER_SEARCH_PRECISION): a product over every row reads 34 MB of float32 on the full
catalogue. "int8" scans an int8 copy instead (a quarter of the bytes). Each column j is scaled by
c_j = max|x_ij| / 127 and rounded (x̂ = c ⊙ xq); the query side (c ⊙ q) is rounded to int8 twice (codes,
then remainder), and the products are summed exactly in int32: by the compiled scan
(anime2vec/native/scan.c, AVX-512 VNNI: the query's rounding, the products, the bound and the
candidates below in one pass over the codes) where it was built and the CPU has VNNI, else by torch's
`_int_mm` with the bound in numpy, exact where the CPU has VNNI or AMX (without, oneDNN pairs
products into a saturating int16: `int8_kernel` probes either at the served shape, and a CPU where
neither is exact scans float32). So |float32 score − approximate| ≤
min(‖x_i − x̂_i‖·‖q‖, Σ_j c_j/2·|q_j|) + ‖xq_i‖·‖c ⊙ q − its rounding‖ + the float32 product's own
error, every term known (`Int8Copy.scores`), and the rows whose approximate score plus that bound
reaches the k-th best lower bound are the candidates (tens for a favourites query on the served
vectors, where Cauchy-Schwarz alone left ~550; past an eighth of the rows the float32 product is
cheaper and is used). "int8" and "auto" (the default) check the bound on the served vectors and that
the int8 search returns the float32 search's pages on them (the compiled scan end to end); "auto" then
times both on one thread at a first page and a re-ranking pool's depth, and keeps int8 when it takes
under 0.9× the float32 time; served vectors that are not all finite, a bound that fails or a page that
differs mean float32.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import starmap
from typing import NamedTuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from anime2vec.index.base import SearchFilter, folded, payload_matches
from anime2vec.native import scan as native_scan
from anime2vec.serving_model.model import ItemMeta

from .ranking import CatalogueFilter

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "int8")
MAX_FRACTION = 0.25
# the blocks kept, least recently used dropped first: a genre page's block is ~1 MB on the full catalogue
# (a few hundred anime), the largest ~8.6 MB (a quarter of it)
CACHED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Block:
    """The bundle rows a search may return (sorted) and, for a selective filter, their vectors
    together; `vectors` None: every row is scored and `rows` kept (`full`: all of them)."""

    rows: np.ndarray
    vectors: np.ndarray | None
    full: bool = False
    top: native_scan.TopRows | None = None  # the rescoring over `vectors` (with them)


CHUNK = 4096  # rows converted at a time: the float64 work of a 16.7k x 516 copy stays ~17 MB, not ~280


def _added_score(meta: ItemMeta, q64: np.ndarray) -> float:
    """An added anime's score, summed as a bundle row's (its vector is the tower's float32 output)."""
    v = np.asarray(meta.vector, np.float32)[None]
    return float(native_scan.row_scores(v, np.zeros(1, np.int64), q64)[0])


def max_row_norm(vectors: np.ndarray) -> tuple[float, bool]:
    """The largest norm of a finite row, and whether every row is finite."""
    top, finite = 0.0, True
    for c in _chunks(vectors):
        sq = np.einsum("ij,ij->i", c, c, dtype=np.float64)
        ok = np.isfinite(sq)
        finite &= bool(ok.all())
        if ok.any():
            top = max(top, float(np.sqrt(sq[ok].max())))
    return top, finite


def float32_rounding(dim: int) -> float:
    """A bound on a float32 product's error relative to ‖x‖·‖q‖: ≤ dim·2⁻²⁴ for the served score,
    again for a rescoring, doubled for the float64 arithmetic of the bounds themselves."""
    return 4 * dim * 2.0**-24


def _chunks(a: np.ndarray):
    return (a[i : i + CHUNK] for i in range(0, len(a), CHUNK))


def _probe(n: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (n, d) and three query rows with the worst cases (all ±127) and random values, and
    their exact products."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (n, d)).astype(np.int8)
    codes[: min(n, 4)] = np.array([127, -127, 127, -127])[: min(n, 4), None]
    query = np.stack([np.full(d, 127), np.full(d, -127), rng.integers(-127, 128, d)]).astype(np.int8)
    return codes, query, query.astype(np.int64) @ codes.astype(np.int64).T


def int8_products_exact(n: int, d: int) -> bool:
    """Whether torch's int8 product sums exactly in int32 at this shape: with VNNI (or AMX) it
    does; without, oneDNN pairs products into a saturating int16 first (an all-127 row times all-127
    codes comes out as 65,280 instead of 16,129·d), and with one column it returns garbage. Probed
    at the served shape."""
    if d < 2 or n < 1:
        return False
    codes, query, exact = _probe(n, d)
    try:
        got = torch._int_mm(torch.from_numpy(query), torch.from_numpy(codes).t()).numpy()
    except RuntimeError:  # no int8 matrix product in this torch build
        return False
    return bool(np.array_equal(got, exact))


def int8_kernel(n: int, d: int) -> str | None:
    """Which exact int8 product the scan uses at this shape: "vnni" (the compiled kernel), "torch"
    (`_int_mm`), or None (neither sums exactly here: scan float32). Each is probed with the worst
    cases (all ±127) and random codes before it is trusted."""
    if n >= 1 and native_scan.available(d):
        codes, query, exact = _probe(min(n, 1024), d)  # the kernel's loop does not depend on n
        try:
            compiled = native_scan.Int8Codes(codes)
            ok = np.array_equal(compiled.dot2(query[:2]), exact[:2]) and np.array_equal(
                compiled.dot2(query[1:]), exact[1:]
            )
        except Exception as e:  # a broken build must not stop the ranker: torch's product serves instead
            log.warning("the compiled int8 kernel failed (%s); trying torch's", e)
        else:
            if ok:
                return "vnni"
            log.warning("the compiled int8 kernel disagreed with exact products; trying torch's")
    return "torch" if int8_products_exact(n, d) else None


class Int8Copy:
    """The vectors as int8 with one scale per column, and what the error bound needs per row.
    `kernel`: "vnni" (anime2vec/native/scan.c) or "torch" (`_int_mm`), as `int8_kernel` chose."""

    def __init__(self, vectors: np.ndarray, kernel: str = "torch"):
        d = vectors.shape[1]
        top = np.max([np.abs(c).max(axis=0) for c in _chunks(vectors)], axis=0).astype(np.float64)
        self.scale = np.where(top > 0, top / 127.0, 1.0)  # c_j
        codes, residual, code_norm, norm = [], [], [], []
        for chunk in _chunks(vectors):
            x = chunk.astype(np.float64)
            q = np.clip(np.rint(x / self.scale), -127, 127)
            codes.append(q.astype(np.int8))
            residual.append(np.linalg.norm(x - q * self.scale, axis=1))  # ‖x_i − x̂_i‖
            code_norm.append(np.linalg.norm(q, axis=1))  # ‖xq_i‖
            norm.append(np.linalg.norm(x, axis=1))
        self.kernel = kernel
        self.codes: torch.Tensor | None = None  # (n, d); _int_mm reads its transpose view
        self.compiled: native_scan.Int8Codes | None = None  # the compiled kernel's layout
        if kernel == "vnni":
            self.compiled = native_scan.Int8Codes(np.concatenate(codes))
        else:
            self.codes = torch.from_numpy(np.concatenate(codes))
        # per row, the bound's parts (`scores`): ‖x_i − x̂_i‖, the float32 rounding term's factor of ‖q‖
        # (4·d·2⁻²⁴·‖x_i‖), ‖xq_i‖
        self.residual = np.concatenate(residual)
        self.f32 = float32_rounding(d) * np.concatenate(norm)
        self.code_norm = np.concatenate(code_norm)
        self.bounds = (
            None
            if self.compiled is None
            else native_scan.RowBounds(self.scale, self.residual, self.f32, self.code_norm)
        )

    def _query(self, query: np.ndarray) -> tuple[np.ndarray, float, float, float, float, float, float]:
        """The query side, c ⊙ q (x̂·q = xq·(c ⊙ q)), rounded to int8 twice: the codes, then their
        remainder; both rows go through one int8 product (it reads the codes once either way).
        Returns the two rows, their weights, ‖q‖, ‖c ⊙ q − its rounding‖, Σ c_j/2·|q_j| and
        ‖c ⊙ q − its first row‖ (the compiled scan rounds the query the same way, in C)."""
        qs = self.scale * query.astype(np.float64)
        b1 = _unit(qs)
        q1 = np.clip(np.rint(qs / b1), -127, 127)
        rest = qs - q1 * b1
        b2 = _unit(rest)
        q2 = np.clip(np.rint(rest / b2), -127, 127)
        qn = float(np.linalg.norm(query.astype(np.float64)))
        left = float(np.linalg.norm(rest - q2 * b2))
        l1 = float(np.sum(0.5 * np.abs(qs)))  # Σ c_j/2·|q_j|
        return np.stack([q1, q2]).astype(np.int8), b1, b2, qn, left, l1, float(np.linalg.norm(rest))

    def scores(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate scores of every row and, per row, a bound on |float32 score − approximate|:
        the codes' error |(x_i − x̂_i)·q| ≤ min(‖x_i − x̂_i‖·‖q‖, Σ c_j/2·|q_j|) (Cauchy-Schwarz, and
        each code within half a step; the second is ~6x tighter on the served vectors), plus the
        query's rounding ‖xq_i‖·‖c ⊙ q − its rounding‖ and the float32 product's own error."""
        approx, slack, _, _ = self._intervals(query)
        return approx, slack

    def _intervals(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`scores`, and the same for the query's first int8 row alone (its own rounding's bound)."""
        rows, w1, w2, qn, left, l1, left1 = self._query(query)
        if self.compiled is not None:
            dots = self.compiled.dot2(rows)
        else:
            assert self.codes is not None
            dots = torch._int_mm(torch.from_numpy(rows), self.codes.t()).numpy()
        err = np.minimum(self.residual * qn, l1)
        f32q = self.f32 * qn
        a1 = dots[0] * w1
        return a1 + dots[1] * w2, err + (f32q + self.code_norm * left), a1, err + (f32q + self.code_norm * left1)

    def candidates(self, query: np.ndarray, k: int, eligible: np.ndarray | None) -> np.ndarray:
        """The rows (ascending) that can be in the exact top k of the eligible ones (None: all; at
        least k): those whose approximate score plus its bound reaches tau, the k-th best approximate
        score minus its bound, each bound the tighter of two (the query's first int8 row alone, and
        both: `native_scan.Int8Codes.scan`). The compiled kernel does it all in its pass over the
        codes, skipping the second row's products for rows the first already rules out; otherwise
        numpy, the same arithmetic."""
        if self.compiled is not None:
            assert self.bounds is not None
            return self.compiled.candidates(query, self.bounds, k, eligible)
        approx, slack, a1, s1 = self._intervals(query)
        # both intervals hold the score: their intersection, kept ordered (as the compiled scan)
        lower = np.minimum(np.maximum(a1 - s1, approx - slack), a1 + s1)
        if eligible is not None:
            lower[~eligible] = -np.inf
        tau = np.partition(lower, len(lower) - k)[len(lower) - k]  # k rows score at least this
        keep = np.maximum(np.minimum(a1 + s1, approx + slack), lower) >= tau
        if eligible is not None:
            keep &= eligible
        return np.flatnonzero(keep)


def _unit(v: np.ndarray) -> float:
    top = float(np.abs(v).max()) if len(v) else 0.0
    return top / 127.0 if top > 0 else 1.0


_NONE = np.zeros(0, np.int64)
_NONE.flags.writeable = False


def _size(block: Block | None) -> int:
    return 0 if block is None else block.rows.nbytes + (0 if block.vectors is None else block.vectors.nbytes)


class ScanHit(NamedTuple):  # a tuple: eleven per request, built ~4x faster than a frozen dataclass
    anime_id: int
    score: float
    row: int | None  # the bundle row; None for an added anime
    added: ItemMeta | None = None  # the added anime (it replaces the bundle row of the same id)


class MemoryScan:
    def __init__(
        self,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        filt: CatalogueFilter,
        max_fraction: float = MAX_FRACTION,
        cached_bytes: int = CACHED_BYTES,
        precision: str = "float32",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.item_ids, self.vectors, self.filt = item_ids, np.ascontiguousarray(vectors, np.float32), filt
        self.max_rows = int(max_fraction * len(item_ids))
        self.rounding = float32_rounding(self.vectors.shape[1])  # relative to max‖x‖·‖q‖ (_float32_candidates)
        self.max_norm, finite = max_row_norm(self.vectors)
        self._top = native_scan.TopRows(self.vectors, np.asarray(item_ids))  # the rescoring over every row
        self.precision = "float32"
        self._int8: Int8Copy | None = None
        self._search: native_scan.Int8Search | None = None  # the compiled search (rescoring from self.vectors)
        if precision != "float32" and len(self.vectors):
            n, d = self.vectors.shape
            if not finite:
                log.warning("in-memory search: the served vectors are not all finite; scanning float32")
            elif (kernel := int8_kernel(n, d)) is None:
                log.warning("in-memory search: this CPU's int8 product does not sum exactly; scanning float32")
            else:
                self._int8 = Int8Copy(self.vectors, kernel)
                if self._int8.compiled is not None and self._int8.bounds is not None:
                    source = native_scan.RowSource(self.vectors, np.ascontiguousarray(item_ids, np.int64))
                    self._search = self._int8.compiled.searcher(self._int8.bounds, source)
                self.precision = self._choose(precision)
                if self.precision == "float32":
                    self._int8 = self._search = None  # nor their ~9 MB of codes kept
        self.cached_bytes = cached_bytes
        self.everything = Block(np.arange(len(item_ids)), None, full=True)
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def int8_kernel(self) -> str | None:
        """The int8 product the scan uses ("vnni", "torch"), None when it scans float32."""
        return self._int8.kernel if self._int8 is not None else None

    def clear_blocks(self) -> None:
        """Forget the cached filter blocks (the bench measures a filter seen for the first time)."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    @staticmethod
    def key(flt: SearchFilter) -> tuple | None:
        """What of `flt` decides the rows (exclusions are applied per query); None: it restricts nothing."""
        if not (flt.include_genres or flt.exclude_genres or flt.types or flt.cold_only):
            if flt.year_min is None and flt.year_max is None:  # most requests: nothing to fold
                return None
        key = (
            tuple(folded(flt.include_genres)),
            tuple(folded(flt.exclude_genres)),
            tuple(folded(flt.types)),
            flt.year_min,
            flt.year_max,
            bool(flt.cold_only),
        )
        return None if key == ((), (), (), None, None, False) else key

    def block(self, flt: SearchFilter) -> Block:
        """The rows `flt` keeps: every row for no filter, a copied block for a selective one."""
        key = self.key(flt)
        if key is None:
            return self.everything
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        genres, not_genres, types, year_min, year_max, cold_only = key
        rows = np.flatnonzero(
            self.filt.mask(SearchFilter(genres, not_genres, types, year_min, year_max, cold_only=cold_only))
        )
        block = Block(rows, None)
        if len(rows) <= self.max_rows:
            vectors = np.ascontiguousarray(self.vectors[rows])
            block = Block(rows, vectors, top=native_scan.TopRows(vectors, self.item_ids, id_rows=rows))
        with self._lock:
            if key in self._blocks:  # another request built it meanwhile
                block = self._blocks[key]
                self._blocks.move_to_end(key)
            else:
                self._blocks[key] = block
                self._bytes += _size(block)
            while self._bytes > self.cached_bytes and len(self._blocks) > 1:
                self._bytes -= _size(self._blocks.popitem(last=False)[1])
        return block

    def search(self, query: np.ndarray, flt: SearchFilter, limit: int, added: dict[int, ItemMeta]) -> list[ScanHit]:
        """The exact top `limit` under `flt`, best first, over the bundle's anime and the added ones
        (`added` replaces bundle rows of the same id)."""
        return self.scan(self.block(flt), query, flt, limit, added)

    def scan(
        self, block: Block, query: np.ndarray, flt: SearchFilter, limit: int, added: dict[int, ItemMeta]
    ) -> list[ScanHit]:
        """`search` over a block already looked up for `flt` (the ranker looks it up to choose the path)."""
        query = np.ascontiguousarray(query, np.float32)
        at = self._never_ranked(block.rows, flt, added)
        top: Iterable[tuple[int, float, int]] | None = None
        int8 = block.vectors is None and self._int8 is not None
        # a query that is not finite ranks no bundle anime; the compiled search checks that itself
        # (numpy's check cost ~0.02 ms with a cold cache)
        if not (int8 and self._search is not None) and not np.isfinite(query).all():
            top = ()
        elif int8:
            top = self._int8_top(block, query, at, limit)
        if top is None:
            picked, scores = self._float32_top(block, query, query.astype(np.float64), at, limit)
            top = zip(self.item_ids[picked].tolist(), scores.tolist(), picked.tolist())
        hits = list(starmap(ScanHit, top))  # (anime id, float64 score, bundle row), best first
        if added:
            q64 = query.astype(np.float64)
            for aid, meta in added.items():
                if meta.vector is not None and payload_matches(meta.payload, flt):
                    hits.append(ScanHit(aid, _added_score(meta, q64), None, meta))
            hits.sort(key=lambda h: (-h.score, h.anime_id))
        return hits[:limit]

    def _never_ranked(self, rows: np.ndarray, flt: SearchFilter, added: dict[int, ItemMeta]) -> np.ndarray:
        """Positions in `rows` excluded by `flt`, or replaced by an added anime of the same id."""
        if not flt.exclude_ids and not added:
            return _NONE
        gone = np.asarray([self.filt.pos[a] for a in {*flt.exclude_ids, *added} if a in self.filt.pos], np.int64)
        if not len(gone) or not len(rows):
            return _NONE
        if len(rows) == len(self.vectors):  # every row (rows are the positions): nothing to look up
            return gone
        at = np.searchsorted(rows, gone)
        return at[(at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == gone)]

    def _float32_top(
        self, block: Block, query: np.ndarray, q64: np.ndarray, at: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 product's candidates, rescored in float64: the best `limit` bundle rows by
        (score, anime id) and their scores; a damaged row (a NaN score) is left out."""
        cand = self._float32_candidates(block, query, q64, at, limit)
        rows = block.rows
        if block.top is not None:
            at_, scores = block.top(cand, q64, limit)
            return rows[cand[at_]], scores
        listed = cand if block.full else rows[cand]
        at_, scores = self._top(listed, q64, limit)
        return listed[at_], scores

    def _float32_candidates(
        self, block: Block, query: np.ndarray, q64: np.ndarray, at: np.ndarray, limit: int
    ) -> np.ndarray:
        """Positions in block.rows whose float32 score comes within the product's own error of the
        k-th best: every row the float64 scores (`native_scan.row_scores`) can put in the top `limit`."""
        if block.vectors is not None:
            scores = block.vectors @ query
        else:
            scores = self.vectors @ query
            if not block.full:
                scores = scores[block.rows]
        scores[np.isnan(scores)] = -np.inf
        scores[at] = -np.inf
        k = min(limit, len(scores) - len(at))
        if k <= 0:
            return np.zeros(0, np.int64)
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        # |float32 − exact| ≤ d·2⁻²⁴·‖x‖‖q‖ for either score of a row; rounding is twice that, again
        margin = self.rounding * self.max_norm * math.sqrt(float(q64 @ q64))
        return np.flatnonzero(scores >= kth - margin)

    def _int8_top(
        self, block: Block, query: np.ndarray, at: np.ndarray, limit: int
    ) -> Iterable[tuple[int, float, int]] | None:
        """`_float32_top` from the int8 scan's candidates (see the module docstring), as (anime id,
        score, row) records: one compiled call with the VNNI kernel, else torch's product, numpy's
        bound and `top_rows`. None when the
        candidates are so many that the float32 product over every row is cheaper. `at`: positions in
        block.rows never ranked (exclusions)."""
        assert self._int8 is not None
        rows = block.rows
        k = min(limit, len(rows) - len(at))
        if k <= 0:
            return []
        eligible = None
        if block.full and len(at):  # rows are every row: at are rows
            eligible = np.ones(len(self.vectors), np.bool_)
            eligible[at] = False
        elif not block.full:
            eligible = np.zeros(len(self.vectors), np.bool_)
            eligible[rows] = True
            eligible[rows[at]] = False
        most = len(rows) // 8
        if self._search is not None:
            return self._search.records(query, k, eligible, limit, most)
        cand = self._int8.candidates(query, k, eligible)  # rows of the catalogue
        if len(cand) > most:
            return None
        at_, scores = self._top(cand, query.astype(np.float64), limit)
        return zip(self.item_ids[cand[at_]].tolist(), scores.tolist(), cand[at_].tolist())

    def _choose(self, precision: str, n_queries: int = 16, repeats: int = 3) -> str:
        """Check the int8 bound on the served vectors (rows as queries, and means of three), and that
        the int8 search returns the float32 search's pages on them (the compiled scan end to end);
        for "auto", time both full scans on them: the faster is kept."""
        assert self._int8 is not None
        rng = np.random.default_rng(0)
        n = len(self.vectors)
        picks = rng.integers(0, n, (n_queries, 3))
        queries = [self.vectors[p[0]] for p in picks[: n_queries // 2]]
        queries += [self.vectors[p].mean(axis=0) for p in picks[n_queries // 2 :]]
        for q in queries:  # int8_products_exact has shown the product runs here
            approx, slack = self._int8.scores(q)
            if not np.all(np.abs(approx - self.vectors @ q) <= slack):  # NaN counts as outside
                log.warning("int8 scan: an error outside its bound on the served vectors; scanning float32")
                return "float32"
        full = Block(np.arange(n), None, full=True)
        int8 = self._int8
        for i, q in enumerate(queries):  # a first page, and a re-ranking pool's depth
            pages = []
            for scan in (int8, None):
                self._int8 = scan
                pages.append(
                    [(h.anime_id, h.score) for h in self.scan(full, q, SearchFilter(), 11 if i % 2 else 100, {})]
                )
            self._int8 = int8
            if pages[0] != pages[1]:
                log.warning(
                    "int8 scan (%s product): a page unlike the float32 search's on the served vectors; scanning float32",
                    int8.kernel,
                )
                return "float32"
        if precision == "int8":
            log.info(
                "in-memory search: int8 with the %s product (its bound held on the served vectors, its pages were "
                "the float32 search's)",
                self._int8.kernel,
            )
            return "int8"
        times: dict[str, list[float]] = {"float32": [], "int8": []}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranker searches: one thread per request (server.py)
        try:
            with threadpool_limits(1):
                for _ in range(repeats):
                    for name in times:  # interleaved: a neighbour's load hits both alike
                        self._int8 = int8 if name == "int8" else None
                        t0 = time.thread_time()  # this thread only: not the ranker's other requests
                        for i, q in enumerate(queries):  # a first page, and a re-ranking pool's depth
                            self.scan(full, q, SearchFilter(), 11 if i % 2 else 100, {})
                        times[name].append(time.thread_time() - t0)
        finally:
            torch.set_num_threads(threads)
        self._int8 = int8
        f32, i8 = min(times["float32"]), min(times["int8"])
        chosen = "int8" if i8 < 0.9 * f32 else "float32"
        log.info(
            "in-memory search: %s (%d queries over %d×%d: float32 %.2f ms, int8 (%s) %.2f ms per query)",
            chosen,
            len(queries),
            n,
            self.vectors.shape[1],
            1e3 * f32 / len(queries),
            int8.kernel,
            1e3 * i8 / len(queries),
        )
        return chosen

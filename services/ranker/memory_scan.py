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
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from anime2vec.index.base import SearchFilter, folded, payload_matches
from anime2vec.serving_model.model import ItemMeta

from .ranking import CatalogueFilter

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


def _size(block: Block | None) -> int:
    return 0 if block is None else block.rows.nbytes + (0 if block.vectors is None else block.vectors.nbytes)


@dataclass(frozen=True)
class ScanHit:
    anime_id: int
    score: float
    row: int | None  # the bundle row; None for an added anime
    added: ItemMeta | None  # the added anime (it replaces the bundle row of the same id)


class MemoryScan:
    def __init__(
        self,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        filt: CatalogueFilter,
        max_fraction: float = MAX_FRACTION,
        cached_bytes: int = CACHED_BYTES,
    ):
        self.item_ids, self.vectors, self.filt = item_ids, np.ascontiguousarray(vectors, np.float32), filt
        self.max_rows = int(max_fraction * len(item_ids))
        self.cached_bytes = cached_bytes
        self.everything = Block(np.arange(len(item_ids)), None, full=True)
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(flt: SearchFilter) -> tuple | None:
        """What of `flt` decides the rows (exclusions are applied per query); None: it restricts nothing."""
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
        block = Block(rows, np.ascontiguousarray(self.vectors[rows]) if len(rows) <= self.max_rows else None)
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
        query = np.asarray(query, np.float32)
        if block.vectors is not None:
            scores = block.vectors @ query
        else:
            scores = self.vectors @ query
            if not block.full:
                scores = scores[block.rows]
        rows = block.rows
        gone = np.asarray([self.filt.pos[a] for a in {*flt.exclude_ids, *added} if a in self.filt.pos], np.int64)
        if len(gone) and len(rows):  # excluded, or replaced by an added anime of the same id
            at = np.searchsorted(rows, gone)
            at = at[(at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == gone)]
            scores[at] = -np.inf
        k = min(limit, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
        hits = [
            ScanHit(int(self.item_ids[rows[i]]), float(scores[i]), int(rows[i]), None)
            for i in top
            if scores[i] > -np.inf
        ]
        for aid, meta in added.items():
            if meta.vector is not None and payload_matches(meta.payload, flt):
                hits.append(ScanHit(aid, float(meta.vector @ query), None, meta))
        hits.sort(key=lambda h: (-h.score, h.anime_id))
        return hits[:limit]

"""Filtered searches answered in memory: the served vectors of the anime a selective filter matches,
kept together per filter, scored with one matrix product.

Qdrant checks a filter through its payload index and scores the matching points one at a time; for a
filter that keeps a few hundred anime that is ~3x slower than numpy over just those rows
(bench/search.py). The vectors are the ones the bundle indexed (`ServingModel.item_tower`) and, for
anime added at run time, the ones written to Qdrant with them (`ItemMeta.vector`), so the ranking is
the exact search's; Qdrant stays the store of record and serves every other search. A filter that
keeps more than MAX_FRACTION of the catalogue goes to Qdrant: its block would be most of the vectors
again, for no gain over the engine's own scan.
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
    """The bundle rows one filter keeps (sorted) and their vectors, contiguous."""

    rows: np.ndarray
    vectors: np.ndarray


def _size(block: Block | None) -> int:
    return 0 if block is None else block.vectors.nbytes + block.rows.nbytes


@dataclass(frozen=True)
class ScanHit:
    anime_id: int
    score: float
    row: int | None  # the bundle row; None for an added anime
    added: ItemMeta | None  # the added anime (it replaces the bundle row of the same id)


class FilteredScan:
    def __init__(
        self,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        filt: CatalogueFilter,
        max_fraction: float = MAX_FRACTION,
        cached_bytes: int = CACHED_BYTES,
    ):
        self.item_ids, self.vectors, self.filt = item_ids, vectors, filt
        self.max_rows = int(max_fraction * len(item_ids))
        self.cached_bytes = cached_bytes
        self._blocks: OrderedDict[tuple, Block | None] = OrderedDict()
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

    def block(self, flt: SearchFilter) -> Block | None:
        """The rows `flt` keeps, or None when it is not selective (left to the engine)."""
        key = self.key(flt)
        if key is None:
            return None
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        genres, not_genres, types, year_min, year_max, cold_only = key
        rows = np.flatnonzero(
            self.filt.mask(SearchFilter(genres, not_genres, types, year_min, year_max, cold_only=cold_only))
        )
        block = Block(rows, np.ascontiguousarray(self.vectors[rows])) if len(rows) <= self.max_rows else None
        with self._lock:
            if key not in self._blocks:  # another request may have built it meanwhile
                self._blocks[key] = block
                self._bytes += _size(block)
            while self._bytes > self.cached_bytes and len(self._blocks) > 1:
                self._bytes -= _size(self._blocks.popitem(last=False)[1])
        return block

    def search(
        self, query: np.ndarray, flt: SearchFilter, limit: int, added: dict[int, ItemMeta]
    ) -> list[ScanHit] | None:
        """The exact top `limit` under `flt`, best first, over the bundle's anime and the added ones
        (`added` replaces bundle rows of the same id); None when the filter is left to the engine."""
        block = self.block(flt)
        return None if block is None else self.scan(block, query, flt, limit, added)

    def scan(
        self, block: Block, query: np.ndarray, flt: SearchFilter, limit: int, added: dict[int, ItemMeta]
    ) -> list[ScanHit]:
        """`search` over a block already looked up for `flt` (the ranker looks it up to choose the path)."""
        query = np.asarray(query, np.float32)
        scores = block.vectors @ query
        gone = np.asarray([self.filt.pos[a] for a in {*flt.exclude_ids, *added} if a in self.filt.pos], np.int64)
        if len(gone) and len(block.rows):  # excluded, or replaced by an added anime of the same id
            at = np.searchsorted(block.rows, gone)
            at = at[(at < len(block.rows)) & (block.rows[np.minimum(at, len(block.rows) - 1)] == gone)]
            scores[at] = -np.inf
        k = min(limit, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
        hits = [
            ScanHit(int(self.item_ids[block.rows[i]]), float(scores[i]), int(block.rows[i]), None)
            for i in top
            if scores[i] > -np.inf
        ]
        for aid, meta in added.items():
            if meta.vector is not None and payload_matches(meta.payload, flt):
                hits.append(ScanHit(aid, float(meta.vector @ query), None, meta))
        hits.sort(key=lambda h: (-h.score, h.anime_id))
        return hits[:limit]

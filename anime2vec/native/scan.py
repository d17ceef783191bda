"""The ranker's compiled scan (scan.c, built as `anime2vec._scan`) behind a numpy interface.

`available(d)` says whether its int8 part can run here at width d: the library was built, this CPU
has AVX-512 VNNI, and d fits its register budget. `Int8Codes(codes).dot2(q)` returns exactly
`q.astype(int64) @ codes.astype(int64).T` for two query rows, as int32; `Int8Codes.scan` runs the
ranker's bounded top-k candidate scan on those products in the same pass (RowBounds says what it needs).
`row_scores` and `top_rows` (any x86-64 CPU where the library was built) score listed float32 rows in
float64, and order the best. `Int8Search.records`, the ranker's call per request, is the scan and the
rescoring through the library's one Python entry point (no ctypes on that path); the rest go through ctypes.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import threading
from dataclasses import dataclass, field

import numpy as np

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_module = None  # the same library imported: its `search`, the ranker's call per request
_vnni = False
_loaded = False


def _library() -> ctypes.CDLL | None:
    global _lib, _vnni, _loaded, _module
    with _lock:
        if not _loaded:
            _loaded = True
            spec = importlib.util.find_spec("anime2vec._scan")
            if spec is not None and spec.origin is not None:
                try:  # a library that does not load or lacks a symbol (a stale build) counts as absent
                    lib = ctypes.CDLL(spec.origin)
                    p, size = ctypes.c_void_p, ctypes.c_size_t
                    lib.a2v_int8_dot2.argtypes = [p, p, size, size, p, p, p, p, p]
                    lib.a2v_int8_dot2.restype = ctypes.c_int
                    lib.a2v_int8_scan.argtypes = [p, p, size, size, p, p, p, p, p, p, p, size, p, p, p, p, p]
                    lib.a2v_int8_scan.restype = ctypes.c_int64
                    lib.a2v_rows_dot.argtypes = [p, size, p, size, p, p]
                    lib.a2v_rows_dot.restype = None
                    lib.a2v_rows_top.argtypes = [p, size, p, size, p, p, p, size, p, p, p]
                    lib.a2v_rows_top.restype = ctypes.c_int64
                    lib.a2v_int8_tail_bytes.argtypes = [size]
                    lib.a2v_int8_tail_bytes.restype = size
                    lib.a2v_int8_max_width.restype = ctypes.c_int
                    _module = importlib.import_module("anime2vec._scan")
                    _vnni = bool(lib.a2v_int8_supported())
                    _lib = lib
                except (OSError, AttributeError, ImportError):
                    _lib = _module = None
        return _lib


def _int8_library() -> ctypes.CDLL | None:
    lib = _library()
    return lib if _vnni else None


def available(d: int) -> bool:
    lib = _int8_library()
    return lib is not None and 1 <= d <= lib.a2v_int8_max_width()


_HUGE_PAGE = 2 << 20


def aligned_int8(shape: tuple[int, int], align: int = 64) -> np.ndarray:
    """A zeroed int8 array whose data starts on an `align`-byte boundary (numpy's start on 16). From
    2 MiB up, its own anonymous mapping asked for transparent huge pages (madvise; honoured where the
    kernel's THP setting is `madvise` or `always`) and started on a 2 MiB boundary. The pass over the
    full catalogue's codes in 4 KiB pages (~2,100 of them, a TLB miss each) measured 1.50-1.56x the
    read floor, in huge pages 1.01-1.04x (the same codes side by side, cold cache); numpy's own
    allocation got huge pages in some runs and not in others."""
    size = shape[0] * shape[1]
    if size < _HUGE_PAGE:
        raw = np.zeros(size + align, np.int8)
        at = -raw.ctypes.data % align
        return raw[at : at + size].reshape(shape)
    # private: a shared anonymous mapping is shmem, which THP leaves alone by default
    region = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: 4 KiB pages, as before
            pass
    raw = np.frombuffer(region, np.int8)
    at = -raw.ctypes.data % _HUGE_PAGE
    return raw[at : at + size].reshape(shape)


class Int8Codes:
    """int8 codes (n, d) as the kernel reads them: each row's whole 64-byte chunks in `main` (rows
    back to back, 64-byte aligned: no load splits a cache line) and its d % 64 columns left in a
    slot of `tail` (a power of two of bytes, zero past d), so no padding is read; and 128 × each
    row's sum (the kernel's unsigned shift of the query, taken back)."""

    def __init__(self, codes: np.ndarray, chunk: int = 4096):
        n, d = codes.shape
        if not available(d):
            raise RuntimeError("the int8 kernel is not available here (available(d) is False)")
        lib = _int8_library()
        assert lib is not None
        full = d // 64 * 64
        self.n, self.d, self.width = n, d, full + 64  # width: the query rows' bytes (the tail's chunk too)
        self._local = threading.local()
        self.main = aligned_int8((n, full))
        self.tail = aligned_int8((n, lib.a2v_int8_tail_bytes(d)))
        self.rowsum128 = np.empty(n, np.int32)
        for i in range(0, n, chunk):
            part = codes[i : i + chunk]
            self.main[i : i + chunk] = part[:, :full]
            self.tail[i : i + chunk, : d - full] = part[:, full:]
            self.rowsum128[i : i + chunk] = 128 * part.sum(axis=1, dtype=np.int32)
        # addresses taken once: `.ctypes.data` costs ~1 µs per access, a tenth of a small search
        self._main_at, self._rowsum_at = self.main.ctypes.data, self.rowsum128.ctypes.data
        self._tail_at = self.tail.ctypes.data if self.tail.size else None

    @property
    def nbytes(self) -> int:
        return self.main.nbytes + self.tail.nbytes + self.rowsum128.nbytes

    def _shifted(self, q: np.ndarray) -> np.ndarray:
        if q.shape != (2, self.d):
            raise ValueError(f"query rows must be (2, {self.d}), got {q.shape}")
        qu = np.full((2, self.width), 128, np.uint8)
        qu[:, : self.d] = (q.astype(np.int16) + 128).astype(np.uint8)
        return qu

    def dot2(self, q: np.ndarray) -> np.ndarray:
        """(2, n) int32: each of the two int8 query rows (values in [-127, 127]) times every row."""
        qu = self._shifted(q)
        out = np.empty((2, self.n), np.int32)
        lib = _int8_library()
        assert lib is not None  # available() held when the codes were laid out
        status = lib.a2v_int8_dot2(
            self._main_at,
            self._tail_at,
            self.n,
            self.d,
            qu[0].ctypes.data,
            qu[1].ctypes.data,
            self.rowsum128.ctypes.data,
            out[0].ctypes.data,
            out[1].ctypes.data,
        )
        if status != 0:
            raise RuntimeError(f"a2v_int8_dot2 refused width {self.d}")
        return out

    def scan(self, query: np.ndarray, bounds: RowBounds, k: int, eligible: np.ndarray | None = None) -> Scan:
        """The rows whose approximate score can reach the k-th best, in one pass over the codes. The
        query (float32, d values) times the column scales c is rounded to int8 twice (the codes, then
        their remainder: `Scan.q`, weighted w1 and w2). With p1, p2 the exact products of row i with
        those rows and e_i = min(residual_i·qn, l1) + f32_i·qn (qn = ‖query‖, l1 = Σ c_j/2·|q_j|), two
        intervals hold the row's float32 score: w1·p1 ± (e_i + code_norm_i·left1) (the first row alone)
        and w1·p1 + w2·p2 ± (e_i + code_norm_i·left) (both; left1, left: what each leaves of c ⊙ q);
        lo_i and up_i are their intersection's ends (kept ordered: lo_i ≤ the first interval's upper
        end, up_i ≥ lo_i, which changes nothing where the bounds hold), tau the k-th largest lo_i over
        the eligible rows, and the rows kept those with up_i ≥ tau (ascending). `eligible`: n bools
        (None: every row), at least k of them true."""
        kept, t = self._scan(query, bounds, k, eligible)
        w1, w2, qn, left, l1, tau, left1 = t.bound.tolist()
        return Scan(t.rows[:kept].copy(), tau, t.q.copy(), w1, w2, qn, left, l1, left1)

    def candidates(
        self, query: np.ndarray, bounds: RowBounds, k: int, eligible: np.ndarray | None = None
    ) -> np.ndarray:
        """`scan`'s rows alone (the ranker's path: no rounding details to copy)."""
        kept, t = self._scan(query, bounds, k, eligible)
        return t.rows[:kept].copy()

    def search(
        self,
        query: np.ndarray,
        bounds: RowBounds,
        k: int,
        eligible: np.ndarray | None,
        source: RowSource,
        limit: int,
        max_cands: int,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """`candidates`, then `top_rows` over them on `source` (the float32 rows the codes were made
        from, and their ids), in one call: the best `limit` rows in `top_rows`' order (score
        descending, ties by id) and their float64 scores; None when more than `max_cands` rows are
        candidates (the caller's cue to scan float32 instead). `searcher` keeps the bounds and
        source for many searches."""
        return self.searcher(bounds, source)(query, k, eligible, limit, max_cands)

    def searcher(self, bounds: RowBounds, source: RowSource) -> Int8Search:
        return Int8Search(self, bounds, source)

    def _checked(self, query: np.ndarray, k: int, eligible: np.ndarray | None) -> tuple[np.ndarray, int | None]:
        """The query as the library reads it, and the address of `eligible` (None: every row). The
        library checks that the query is finite (its rounding to int8 would be undefined)."""
        query = np.ascontiguousarray(query, np.float32)
        if query.shape != (self.d,):
            raise ValueError(f"the query must be ({self.d},), got {query.shape}")
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be between 1 and the number of eligible rows, got {k}")
        if eligible is None:
            return query, None
        eligible = np.ascontiguousarray(eligible, np.bool_)
        if eligible.shape != (self.n,):
            raise ValueError(f"eligible must be ({self.n},), got {eligible.shape}")
        return query, eligible.ctypes.data

    def _refused(self, status: int, k: int) -> None:
        if status == -2:
            raise ValueError(f"k must be between 1 and the number of eligible rows, got {k}")
        if status == -4:
            raise ValueError("the query must be finite")
        raise RuntimeError(f"a2v_int8_scan refused width {self.d}")

    def _scan(self, query: np.ndarray, bounds: RowBounds, k: int, eligible: np.ndarray | None) -> tuple[int, _Scratch]:
        """a2v_int8_scan: the candidates' count, and the scratch that holds them."""
        if bounds.scale.shape != (self.d,) or bounds.residual.shape != (self.n,):
            raise ValueError(f"the row bounds must be for ({self.n}, {self.d}) codes")
        query, at = self._checked(query, k, eligible)
        t = self._scratch(k)
        lib = _int8_library()
        assert lib is not None
        head = (self._main_at, self._tail_at, self.n, self.d, self._rowsum_at, query.ctypes.data)
        kept = lib.a2v_int8_scan(*head, *bounds.addresses, at, k, *t.addresses)
        if kept < 0:
            self._refused(kept, k)
        return kept, t

    def _scratch(self, k: int) -> _Scratch:
        """This thread's buffers for a scan with this k (kept, not allocated per search: the n-row
        ones are over glibc's mmap threshold, and each array's address costs ~1 µs to take)."""
        t = getattr(self._local, "scratch", None)
        if t is None or len(t.heap) < k:
            t = self._local.scratch = _Scratch(self.n, self.d, max(k, 128 if t is None else 2 * len(t.heap)))
        return t


class Int8Search:
    """`Int8Codes.search` for one set of row bounds and source rows, checked and their addresses
    taken once: the ranker's call per request, with as little Python around the pass as it needs
    (each layer of it costs the most when the pass has just flushed the caches)."""

    def __init__(self, codes: Int8Codes, bounds: RowBounds, source: RowSource):
        n, d = codes.n, codes.d
        if bounds.scale.shape != (d,) or bounds.residual.shape != (n,):
            raise ValueError(f"the row bounds must be for ({n}, {d}) codes")
        if source.vectors.shape != (n, d):
            raise ValueError(f"the source vectors must be ({n}, {d})")
        assert _int8_library() is not None and _module is not None  # available() held when the codes were laid out
        self.codes, self.bounds, self.source = codes, bounds, source  # kept alive: the library reads them
        self._search = _module.search
        self._fixed = (
            codes._main_at,
            codes._tail_at,
            n,
            d,
            codes._rowsum_at,
            *bounds.addresses,
            source.vectors_at,
            source.ids_at,
        )

    def records(
        self, query: np.ndarray, k: int, eligible: np.ndarray | None, limit: int, max_cands: int
    ) -> list[tuple[int, float, int]] | None:
        """As `Int8Codes.search`, the answer as (id, score, row) tuples, best first: one call of the
        library's Python entry point (scan.c `search`), which checks the query and `eligible`. A
        query that is not finite gets [] (nothing ranks against it)."""
        if eligible is not None:
            eligible = np.ascontiguousarray(eligible, np.bool_)
        t = self.codes._scratch(k)
        return self._search(self._fixed, t.everything, query, eligible, k, min(limit, self.codes.n), max_cands)

    def __call__(
        self, query: np.ndarray, k: int, eligible: np.ndarray | None, limit: int, max_cands: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """As `Int8Codes.search`: the rows and their scores as arrays."""
        got = self.records(np.ascontiguousarray(query, np.float32), k, eligible, limit, max_cands)
        if got is None:
            return None
        return np.array([r for _, _, r in got], np.int64), np.array([s for _, s, _ in got], np.float64)


class _Scratch:
    def __init__(self, n: int, d: int, k: int):
        self.heap, self.rows, self.upper = np.empty(k, np.float64), np.empty(n, np.int64), np.empty(n, np.float64)
        self.q, self.bound = np.empty((2, d), np.int8), np.empty(7, np.float64)
        # in a2v_int8_scan's order: heap, cand, upper, qrows, bound
        self.addresses = tuple(a.ctypes.data for a in (self.heap, self.rows, self.upper, self.q, self.bound))
        self.hits = np.empty((n, 3), np.float64)  # a2v_int8_search's (score, id, position) structs
        self.out_rows, self.out_scores = np.empty(n, np.int64), np.empty(n, np.float64)  # and its answer
        search_out = (self.hits.ctypes.data, self.out_rows.ctypes.data, self.out_scores.ctypes.data)
        self.everything = self.addresses + search_out  # in scan.c `search`'s order


@dataclass(frozen=True)
class RowBounds:
    """What `Int8Codes.scan` needs besides the query: the codes' column scales c (d), and per row
    ‖x_i − x̂_i‖, the float32 rounding term (its factor of ‖q‖) and ‖xq_i‖ (n each); float64."""

    scale: np.ndarray
    residual: np.ndarray
    f32: np.ndarray
    code_norm: np.ndarray
    addresses: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)  # of the four, in order

    def __post_init__(self) -> None:
        arrays = (self.scale, self.residual, self.f32, self.code_norm)
        for a in arrays:
            if a.dtype != np.float64 or not a.flags.c_contiguous or a.ndim != 1:
                raise ValueError("row bounds must be contiguous float64 vectors")
        if not self.residual.shape == self.f32.shape == self.code_norm.shape:
            raise ValueError("residual, f32 and code_norm must have one value per row")
        object.__setattr__(self, "addresses", tuple(a.ctypes.data for a in arrays))  # frozen: set once here


@dataclass(frozen=True)
class RowSource:
    """The float32 rows (n, d, C-contiguous) the codes were made from and their ids (n, int64): what
    `Int8Codes.search` rescores its candidates from."""

    vectors: np.ndarray
    ids: np.ndarray
    vectors_at: int = field(init=False, repr=False, compare=False)
    ids_at: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        v, ids = self.vectors, self.ids
        if v.dtype != np.float32 or v.ndim != 2 or not v.flags.c_contiguous:
            raise ValueError("vectors must be a C-contiguous float32 matrix")
        if ids.dtype != np.int64 or ids.shape != (len(v),) or not ids.flags.c_contiguous:
            raise ValueError("ids must be contiguous int64, one per row")
        object.__setattr__(self, "vectors_at", v.ctypes.data)  # frozen: set once here
        object.__setattr__(self, "ids_at", ids.ctypes.data)


@dataclass(frozen=True)
class Scan:
    """`Int8Codes.scan`'s answer: the candidate rows, tau, and the query's rounding it used."""

    rows: np.ndarray
    tau: float
    q: np.ndarray  # (2, d) int8
    w1: float
    w2: float
    qn: float
    left: float
    l1: float
    left1: float  # ‖c ⊙ q − its first int8 row‖: the bound of the first row's products alone


def _listed(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rows` as int64 and `q` as float64, checked against `vectors` (the compiled loops trust them)."""
    rows = np.ascontiguousarray(rows, np.int64)
    q = np.ascontiguousarray(q, np.float64)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or not vectors.flags.c_contiguous:
        raise ValueError("vectors must be a C-contiguous float32 matrix")
    n, d = vectors.shape
    if q.shape != (d,):
        raise ValueError(f"the query must be ({d},), got {q.shape}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError("a row outside the vectors")
    return rows, q


def row_scores(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 dot products of vectors[rows] (float32, C-contiguous) with q, each summed in one fixed
    order, so a row's score depends on that row alone, never on which others are scored with it."""
    rows, q = _listed(vectors, rows, q)
    d = vectors.shape[1]
    lib = _library()
    if lib is None:
        return (vectors[rows].astype(np.float64) * q).sum(axis=1)
    out = np.empty(len(rows), np.float64)
    if len(rows):
        lib.a2v_rows_dot(vectors.ctypes.data, d, rows.ctypes.data, len(rows), q.ctypes.data, out.ctypes.data)
    return out


def top_rows(
    vectors: np.ndarray,
    rows: np.ndarray,
    ids: np.ndarray,
    q: np.ndarray,
    limit: int,
    id_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The listed rows of `vectors` scored as `row_scores` scores them, and the best `limit` in order:
    score descending, ties by id ascending (the id of vectors' row i: ids[id_rows[i]], or ids[i]
    without id_rows); a row whose score is NaN or −∞ (a damaged row) is left out. Returns the
    positions in `rows` and their scores. One compiled call where the library was built (the
    ordering included), else numpy's sums (rounded in another order) and lexsort. `TopRows` keeps
    the vectors and ids for many calls."""
    return TopRows(vectors, ids, id_rows)(rows, q, limit)


class TopRows:
    """`top_rows` over one matrix of float32 rows and their ids, checked and their addresses taken
    once (the ranker keeps one for its vectors and one per filter block), with per-thread scratch:
    a filtered search is ~60 µs, and each array's address costs ~1 µs to take."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, id_rows: np.ndarray | None = None):
        if vectors.dtype != np.float32 or vectors.ndim != 2 or not vectors.flags.c_contiguous:
            raise ValueError("vectors must be a C-contiguous float32 matrix")
        n = len(vectors)
        ids = np.ascontiguousarray(ids, np.int64)
        if id_rows is not None:
            id_rows = np.ascontiguousarray(id_rows, np.int64)
            if id_rows.shape != (n,) or (n and (id_rows.min() < 0 or id_rows.max() >= len(ids))):
                raise IndexError("id_rows must map every row of the vectors into ids")
        elif n > len(ids):
            raise IndexError("fewer ids than rows")
        self.vectors, self.ids, self.id_rows = vectors, ids, id_rows  # kept alive: the library reads them
        self.n, self.d = vectors.shape
        self._fixed = (vectors.ctypes.data, ids.ctypes.data, None if id_rows is None else id_rows.ctypes.data)
        self._local = threading.local()

    def __call__(self, rows: np.ndarray, q: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """As `top_rows`, for these rows and query."""
        rows, q = _listed(self.vectors, rows, q)
        limit = max(0, min(int(limit), len(rows)))
        lib = _library()
        if lib is None:
            scores = (self.vectors[rows].astype(np.float64) * q).sum(axis=1)
            of = self.ids[self.id_rows[rows]] if self.id_rows is not None else self.ids[rows]
            keep = np.flatnonzero(scores > -np.inf)
            order = keep[np.lexsort((of[keep], -scores[keep]))][:limit]
            return order, scores[order]
        vectors_at, ids_at, id_rows_at = self._fixed
        t = self._scratch(len(rows))
        got = lib.a2v_rows_top(
            vectors_at, self.d, rows.ctypes.data, len(rows), id_rows_at, ids_at, q.ctypes.data, limit, *t[1]
        )
        at, out = t[0]
        return at[:got].copy(), out[:got].copy()  # the scratch serves the next call

    def _scratch(self, m: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, int, int]]:
        """This thread's (score, id, position) structs for m rows and the answer's room, with their
        addresses; grown as needed."""
        t = getattr(self._local, "t", None)
        if t is None or len(t[0][0]) < max(m, 1):
            size = max(m, 1, 64 if t is None else 2 * len(t[0][0]))
            hits = np.empty((size, 3), np.float64)  # 24 bytes each
            at, out = np.empty(size, np.int64), np.empty(size, np.float64)
            t = self._local.t = ((at, out), (hits.ctypes.data, at.ctypes.data, out.ctypes.data), hits)
        return t[0], t[1]

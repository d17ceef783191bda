"""The ranker's compiled scan (scan.c, built as `anime2vec._scan`) behind a numpy interface.

`available(d)` says whether its int8 part can run here at width d: the library was built, this CPU
has AVX-512 VNNI, and d fits its register budget. `PaddedCodes(codes).dot2(q)` returns exactly
`q.astype(int64) @ codes.astype(int64).T` for two query rows, as int32; `PaddedCodes.scan` runs the
ranker's bounded top-k candidate scan on those products in the same pass (ScanBound says how).
`row_scores` (any x86-64 CPU where the library was built) scores listed float32 rows in float64.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from dataclasses import dataclass, field

import numpy as np

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_vnni = False
_loaded = False


def _library() -> ctypes.CDLL | None:
    global _lib, _vnni, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            spec = importlib.util.find_spec("anime2vec._scan")
            if spec is not None and spec.origin is not None:
                try:  # a library that does not load or lacks a symbol (a stale build) counts as absent
                    lib = ctypes.CDLL(spec.origin)
                    p, size = ctypes.c_void_p, ctypes.c_size_t
                    lib.a2v_int8_dot2.argtypes = [p, size, size, p, p, p, p, p]
                    lib.a2v_int8_dot2.restype = ctypes.c_int
                    lib.a2v_int8_scan.argtypes = [p, size, size, p, p, size, p, p, p, p, p, size, p, p, p, p, p]
                    lib.a2v_int8_scan.restype = ctypes.c_int64
                    lib.a2v_rows_dot.argtypes = [p, size, p, size, p, p]
                    lib.a2v_rows_dot.restype = None
                    _vnni = bool(lib.a2v_int8_supported())
                    _lib = lib
                except (OSError, AttributeError):
                    _lib = None
        return _lib


def _int8_library() -> ctypes.CDLL | None:
    lib = _library()
    return lib if _vnni else None


def stride(d: int) -> int:
    return -(-d // 64) * 64


def available(d: int) -> bool:
    lib = _int8_library()
    return lib is not None and 1 <= d and stride(d) <= lib.a2v_int8_max_stride()


class PaddedCodes:
    """int8 codes (n, d) in the kernel's layout: rows zero-padded to a multiple of 64 bytes, and
    128 × each row's sum (the kernel's unsigned shift of the query, taken back)."""

    def __init__(self, codes: np.ndarray, chunk: int = 4096):
        n, d = codes.shape
        if not available(d):
            raise RuntimeError("the int8 kernel is not available here (available(d) is False)")
        self.n, self.d, self.stride = n, d, stride(d)
        self._local = threading.local()
        self.codes = np.zeros((n, self.stride), np.int8)
        self.rowsum128 = np.empty(n, np.int32)
        for i in range(0, n, chunk):
            part = codes[i : i + chunk]
            self.codes[i : i + chunk, :d] = part
            self.rowsum128[i : i + chunk] = 128 * part.sum(axis=1, dtype=np.int32)
        # addresses taken once: `.ctypes.data` costs ~1 µs per access, a tenth of a small search
        self._codes_at, self._rowsum_at = self.codes.ctypes.data, self.rowsum128.ctypes.data

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.rowsum128.nbytes

    def _shifted(self, q: np.ndarray) -> np.ndarray:
        if q.shape != (2, self.d):
            raise ValueError(f"query rows must be (2, {self.d}), got {q.shape}")
        qu = np.full((2, self.stride), 128, np.uint8)
        qu[:, : self.d] = (q.astype(np.int16) + 128).astype(np.uint8)
        return qu

    def dot2(self, q: np.ndarray) -> np.ndarray:
        """(2, n) int32: each of the two int8 query rows (values in [-127, 127]) times every row."""
        qu = self._shifted(q)
        out = np.empty((2, self.n), np.int32)
        lib = _int8_library()
        assert lib is not None  # available() held when the codes were laid out
        status = lib.a2v_int8_dot2(
            self.codes.ctypes.data,
            self.n,
            self.stride,
            qu[0].ctypes.data,
            qu[1].ctypes.data,
            self.rowsum128.ctypes.data,
            out[0].ctypes.data,
            out[1].ctypes.data,
        )
        if status != 0:
            raise RuntimeError(f"a2v_int8_dot2 refused stride {self.stride}")
        return out

    def scan(self, query: np.ndarray, bounds: RowBounds, k: int, eligible: np.ndarray | None = None) -> Scan:
        """The rows whose approximate score can reach the k-th best, in one pass over the codes. The
        query (float32, d values) times the column scales c is rounded to int8 twice (the codes, then
        their remainder: `Scan.q`, weighted w1 and w2); row i's approximate score is
        a_i = w1·p1_i + w2·p2_i (p: the exact products with those rows), its bound
        s_i = min(residual_i·qn, l1) + f32_i·qn + code_norm_i·left (qn = ‖query‖, left = ‖the
        remainder's rounding‖, l1 = Σ c_j/2·|q_j|), tau the k-th largest a_i − s_i over the eligible
        rows, and the rows kept those with a_i + s_i ≥ tau (ascending). `eligible`: n bools (None:
        every row), at least k of them true."""
        query = np.ascontiguousarray(query, np.float32)
        if query.shape != (self.d,):
            raise ValueError(f"the query must be ({self.d},), got {query.shape}")
        if not np.isfinite(query).all():  # its rounding to int8 would be undefined
            raise ValueError("the query must be finite")
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be between 1 and the number of eligible rows, got {k}")
        if bounds.scale.shape != (self.d,) or bounds.residual.shape != (self.n,):
            raise ValueError(f"the row bounds must be for ({self.n}, {self.d}) codes")
        if eligible is not None:
            eligible = np.ascontiguousarray(eligible, np.bool_)
            if eligible.shape != (self.n,):
                raise ValueError(f"eligible must be ({self.n},), got {eligible.shape}")
        t = self._scratch(k)
        lib = _int8_library()
        assert lib is not None
        kept = lib.a2v_int8_scan(
            self._codes_at,
            self.n,
            self.stride,
            self._rowsum_at,
            query.ctypes.data,
            self.d,
            *bounds.addresses,
            None if eligible is None else eligible.ctypes.data,
            k,
            *t.addresses,
        )
        if kept == -2:
            raise ValueError(f"k must be between 1 and the number of eligible rows, got {k}")
        if kept < 0:
            raise RuntimeError(f"a2v_int8_scan refused stride {self.stride}")
        w1, w2, qn, left, l1, tau = t.bound.tolist()
        return Scan(t.rows[:kept].copy(), tau, t.q.copy(), w1, w2, qn, left, l1)

    def _scratch(self, k: int) -> _Scratch:
        """This thread's buffers for a scan with this k (kept, not allocated per search: the n-row
        ones are over glibc's mmap threshold, and each array's address costs ~1 µs to take)."""
        t = getattr(self._local, "scratch", None)
        if t is None or len(t.heap) < k:
            t = self._local.scratch = _Scratch(self.n, self.d, max(k, 128 if t is None else 2 * len(t.heap)))
        return t


class _Scratch:
    def __init__(self, n: int, d: int, k: int):
        self.heap, self.rows, self.upper = np.empty(k, np.float64), np.empty(n, np.int64), np.empty(n, np.float64)
        self.q, self.bound = np.empty((2, d), np.int8), np.empty(6, np.float64)
        # in a2v_int8_scan's order: heap, cand, upper, qrows, bound
        self.addresses = tuple(a.ctypes.data for a in (self.heap, self.rows, self.upper, self.q, self.bound))


@dataclass(frozen=True)
class RowBounds:
    """What `PaddedCodes.scan` needs besides the query: the codes' column scales c (d), and per row
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
class Scan:
    """`PaddedCodes.scan`'s answer: the candidate rows, tau, and the query's rounding it used."""

    rows: np.ndarray
    tau: float
    q: np.ndarray  # (2, d) int8
    w1: float
    w2: float
    qn: float
    left: float
    l1: float


def row_scores_compiled() -> bool:
    """Whether `row_scores` runs compiled here (else numpy: the same sums, rounded in another order)."""
    return _library() is not None


def row_scores(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 dot products of vectors[rows] (float32, C-contiguous) with q, each summed in one fixed
    order, so a row's score depends on that row alone, never on which others are scored with it."""
    rows = np.ascontiguousarray(rows, np.int64)
    q = np.ascontiguousarray(q, np.float64)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or not vectors.flags.c_contiguous:
        raise ValueError("vectors must be a C-contiguous float32 matrix")
    n, d = vectors.shape
    if q.shape != (d,):
        raise ValueError(f"the query must be ({d},), got {q.shape}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError("a row outside the vectors")
    lib = _library()
    if lib is None:
        return (vectors[rows].astype(np.float64) * q).sum(axis=1)
    out = np.empty(len(rows), np.float64)
    if len(rows):
        lib.a2v_rows_dot(vectors.ctypes.data, d, rows.ctypes.data, len(rows), q.ctypes.data, out.ctypes.data)
    return out

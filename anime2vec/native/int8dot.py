"""The int8 dot-product kernel (int8dot.c, built as `anime2vec._int8dot`) behind a numpy interface.

`available(d)` says whether it can run here at width d: the library was built, this CPU has
AVX-512 VNNI, and d fits its register budget. `PaddedCodes(codes).dot2(q)` returns exactly
`q.astype(int64) @ codes.astype(int64).T` for two query rows, as int32.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading

import numpy as np

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_loaded = False


def _library() -> ctypes.CDLL | None:
    global _lib, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            spec = importlib.util.find_spec("anime2vec._int8dot")
            if spec is not None and spec.origin is not None:
                try:  # a library that does not load or lacks a symbol (a stale build) counts as absent
                    lib = ctypes.CDLL(spec.origin)
                    if lib.a2v_int8_supported():
                        p = ctypes.c_void_p
                        lib.a2v_int8_dot2.argtypes = [p, ctypes.c_size_t, ctypes.c_size_t, p, p, p, p, p]
                        lib.a2v_int8_dot2.restype = ctypes.c_int
                        _lib = lib
                except (OSError, AttributeError):
                    _lib = None
        return _lib


def stride(d: int) -> int:
    return -(-d // 64) * 64


def available(d: int) -> bool:
    lib = _library()
    return lib is not None and 1 <= d and stride(d) <= lib.a2v_int8_max_stride()


class PaddedCodes:
    """int8 codes (n, d) in the kernel's layout: rows zero-padded to a multiple of 64 bytes, and
    128 × each row's sum (the kernel's unsigned shift of the query, taken back)."""

    def __init__(self, codes: np.ndarray, chunk: int = 4096):
        n, d = codes.shape
        if not available(d):
            raise RuntimeError("the int8 kernel is not available here (available(d) is False)")
        self.n, self.d, self.stride = n, d, stride(d)
        self.codes = np.zeros((n, self.stride), np.int8)
        self.rowsum128 = np.empty(n, np.int32)
        for i in range(0, n, chunk):
            part = codes[i : i + chunk]
            self.codes[i : i + chunk, :d] = part
            self.rowsum128[i : i + chunk] = 128 * part.sum(axis=1, dtype=np.int32)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.rowsum128.nbytes

    def dot2(self, q: np.ndarray) -> np.ndarray:
        """(2, n) int32: each of the two int8 query rows (values in [-127, 127]) times every row."""
        if q.shape != (2, self.d):
            raise ValueError(f"query rows must be (2, {self.d}), got {q.shape}")
        qu = np.full((2, self.stride), 128, np.uint8)
        qu[:, : self.d] = (q.astype(np.int16) + 128).astype(np.uint8)
        out = np.empty((2, self.n), np.int32)
        lib = _library()
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

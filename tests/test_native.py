"""The compiled int8 kernel (anime2vec/native/int8dot.c) against exact int64 products: every shape
the layout pads differently, the extreme codes, and the widest input it accepts."""

from __future__ import annotations

import numpy as np
import pytest

from anime2vec.native import int8dot

pytestmark = pytest.mark.skipif(
    not int8dot.available(1), reason="the int8 kernel was not built here or this CPU has no AVX-512 VNNI"
)


@pytest.mark.parametrize("n, d", [(0, 5), (1, 1), (3, 63), (4, 64), (5, 65), (9, 516), (1027, 516), (6, 4096)])
def test_the_kernel_sums_exactly(n, d):
    rng = np.random.default_rng(n * 7919 + d)
    codes = rng.integers(-127, 128, (n, d)).astype(np.int8)
    codes[: min(n, 2)] = np.array([127, -127])[: min(n, 2), None]  # the largest sums, both signs
    for q in (
        rng.integers(-127, 128, (2, d)),
        np.stack([np.full(d, 127), np.full(d, -127)]),
        np.zeros((2, d)),
    ):
        q = q.astype(np.int8)
        got = int8dot.PaddedCodes(codes).dot2(q)
        assert got.dtype == np.int32 and got.shape == (2, n)
        assert np.array_equal(got, q.astype(np.int64) @ codes.astype(np.int64).T)


def test_the_layout_and_its_limits():
    codes = np.arange(-60, 60, dtype=np.int8).reshape(2, 60)
    padded = int8dot.PaddedCodes(codes)
    assert padded.stride == 64 and padded.codes.shape == (2, 64) and not padded.codes[:, 60:].any()
    assert padded.rowsum128.tolist() == [128 * int(r.sum()) for r in codes.astype(np.int64)]
    with pytest.raises(ValueError, match=r"\(2, 60\)"):
        padded.dot2(np.zeros((1, 60), np.int8))
    assert int8dot.available(4096) and not int8dot.available(4097) and not int8dot.available(0)
    with pytest.raises(RuntimeError, match="not available"):
        int8dot.PaddedCodes(np.zeros((1, 4097), np.int8))

"""The compiled int8 kernel (anime2vec/native/scan.c) against exact int64 products: every shape
the kernel masks differently (and every count of rows in the last group of four), the extreme codes,
the widest input it accepts; and its bounded top-k scan against the same arithmetic in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from anime2vec.native import scan as native_scan

pytestmark = pytest.mark.skipif(
    not native_scan.available(1), reason="the int8 kernel was not built here or this CPU has no AVX-512 VNNI"
)


@pytest.mark.parametrize(
    "n, d",
    [
        (0, 5),
        (1, 1),
        (2, 2),
        (3, 63),
        (4, 64),
        (5, 65),
        (5, 100),
        (9, 516),
        (1027, 516),
        (4, 840),
        (3, 4095),
        (6, 4096),
    ],
)
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
        got = native_scan.Int8Codes(codes).dot2(q)
        assert got.dtype == np.int32 and got.shape == (2, n)
        assert np.array_equal(got, q.astype(np.int64) @ codes.astype(np.int64).T)


def test_the_layout_and_its_limits():
    codes = np.arange(-60, 60, dtype=np.int8).reshape(2, 60)
    padded = native_scan.Int8Codes(codes)
    assert padded.width == 64 and padded.main.shape == (2, 0) and padded.tail.shape == (2, 64)
    assert np.array_equal(padded.tail[:, :60], codes) and not padded.tail[:, 60:].any()
    wide = native_scan.Int8Codes(np.ones((3, 516), np.int8))  # the served width: 8 chunks, 4 columns left
    assert wide.main.shape == (3, 512) and wide.tail.shape == (3, 4) and wide.main.ctypes.data % 64 == 0
    assert wide.nbytes == 3 * 516 + 3 * 4  # no padding kept (or read), only the row sums beside
    assert padded.rowsum128.tolist() == [128 * int(r.sum()) for r in codes.astype(np.int64)]
    with pytest.raises(ValueError, match=r"\(2, 60\)"):
        padded.dot2(np.zeros((1, 60), np.int8))
    assert native_scan.available(4096) and not native_scan.available(4097) and not native_scan.available(0)
    with pytest.raises(RuntimeError, match="not available"):
        native_scan.Int8Codes(np.zeros((1, 4097), np.int8))


def _huge_kib(address: int) -> int | None:
    """AnonHugePages of the mapping that holds `address` (Linux /proc/self/smaps), None elsewhere."""
    import re

    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    inside = False
    for line in text.splitlines():
        if m := re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line):
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def test_large_codes_start_on_a_huge_page_and_get_huge_pages_where_the_kernel_gives_them():
    """The full catalogue's codes (8.6 MB) in 4 KiB pages made the pass 1.5x slower (a TLB miss every
    4 KiB): from 2 MiB up they get a mapping of their own, 2 MiB aligned and advised for huge pages."""
    from pathlib import Path

    codes = native_scan.Int8Codes(np.ones((9000, 516), np.int8))  # 4.6 MB of whole chunks
    assert codes.main.ctypes.data % (2 << 20) == 0 and codes.main.flags.writeable
    assert (codes.main == 1).all() and codes.main.shape == (9000, 512)
    small = native_scan.Int8Codes(np.ones((10, 516), np.int8))
    assert small.main.ctypes.data % 64 == 0 and (small.main == 1).all()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    setting = thp.read_text() if thp.exists() else ""
    if "[madvise]" not in setting and "[always]" not in setting:
        pytest.skip(f"transparent huge pages are off here ({setting.strip() or 'no THP'})")
    huge = _huge_kib(codes.main.ctypes.data)
    assert huge is not None and huge >= 2048, f"{huge} KiB of huge pages behind the codes"


def _reference_rounding(query, scale):
    """The query's two int8 rows as services/ranker/memory_scan.py rounds them in numpy."""
    qs = scale * query.astype(np.float64)
    b1 = np.abs(qs).max() / 127 if np.abs(qs).max() > 0 else 1.0
    q1 = np.clip(np.rint(qs / b1), -127, 127)
    rest = qs - q1 * b1
    b2 = np.abs(rest).max() / 127 if np.abs(rest).max() > 0 else 1.0
    q2 = np.clip(np.rint(rest / b2), -127, 127)
    left = np.linalg.norm(rest - q2 * b2)
    l1 = np.sum(0.5 * np.abs(qs))
    qn = np.linalg.norm(query.astype(np.float64))
    return np.stack([q1, q2]).astype(np.int8), b1, b2, qn, left, l1, np.linalg.norm(rest)


def _reference_scan(codes, got, bounds, k, eligible):
    """The scan's definition in numpy, on the rounding the kernel reports (Scan.q, w1, w2, qn, left, l1)."""
    p = got.q.astype(np.int64) @ codes.astype(np.int64).T
    a1 = p[0] * got.w1
    approx = a1 + p[1] * got.w2
    err = np.minimum(bounds.residual * got.qn, got.l1)
    slack = err + (bounds.f32 * got.qn + bounds.code_norm * got.left)
    s1 = err + (bounds.f32 * got.qn + bounds.code_norm * got.left1)
    lower = np.minimum(np.maximum(a1 - s1, approx - slack), a1 + s1)
    upper = np.maximum(np.minimum(a1 + s1, approx + slack), lower)
    ok = np.ones(len(approx), bool) if eligible is None else eligible
    lower[~ok] = -np.inf
    tau = np.partition(lower, len(lower) - k)[len(lower) - k]
    return np.flatnonzero((upper >= tau) & ok), tau


@pytest.mark.parametrize("n, d", [(1, 3), (5, 65), (70, 512), (1027, 516), (300, 1000)])
def test_the_scan_keeps_exactly_the_rows_that_can_reach_the_kth_best(n, d):
    """The query is rounded as numpy rounds it, and the candidates and tau equal numpy's over the
    exact products: every k, with and without an eligibility mask, with ties (repeated rows), with
    bounds from zero to wider than the scores, at widths with the query in registers and beyond."""
    rng = np.random.default_rng(n + d)
    codes = rng.integers(-127, 128, (n, d)).astype(np.int8)
    codes[n // 2 :: 3] = codes[0]  # exact ties
    padded = native_scan.Int8Codes(codes)
    scale = rng.random(d) + 0.01
    checked = 0
    for spread in (0.0, 1e-3, 10.0, 1e4):
        # residuals on either side of l1 (the bound takes the smaller), so both branches are checked
        bounds = native_scan.RowBounds(
            scale, spread * rng.random(n), spread * rng.random(n) / 10, spread * rng.random(n)
        )
        for query in (rng.normal(size=d).astype(np.float32), np.zeros(d, np.float32)):
            for eligible in (None, rng.random(n) < 0.7):
                m = n if eligible is None else int(eligible.sum())
                for k in sorted({1, 2, 11, m}):
                    if not 1 <= k <= m:
                        continue
                    got = padded.scan(query, bounds, k, eligible)
                    q, w1, w2, qn, left, l1, left1 = _reference_rounding(query, scale)
                    assert np.array_equal(got.q, q) and (got.w1, got.w2) == (w1, w2)
                    assert got.l1 == pytest.approx(l1, rel=1e-12, abs=1e-300)
                    assert got.left1 == pytest.approx(left1, rel=1e-9, abs=1e-300)
                    assert got.qn == pytest.approx(qn, rel=1e-12) and got.left == pytest.approx(
                        left, rel=1e-9, abs=1e-300
                    )
                    want, tau = _reference_scan(codes, got, bounds, k, eligible)
                    assert got.tau == tau
                    assert np.array_equal(got.rows, want)
                    assert len(got.rows) >= k
                    checked += 1
    assert checked >= 8  # every bound spread, at least one k


def test_the_scan_refuses_what_it_cannot_answer():
    padded = native_scan.Int8Codes(np.ones((4, 8), np.int8))
    q = np.ones(8, np.float32)
    bounds = native_scan.RowBounds(np.ones(8), np.zeros(4), np.zeros(4), np.zeros(4))
    for k in (0, -1, 5):
        with pytest.raises(ValueError, match="k must be"):
            padded.scan(q, bounds, k)
    with pytest.raises(ValueError, match="finite"):
        padded.scan(np.full(8, np.nan, np.float32), bounds, 1)
    with pytest.raises(ValueError, match="k must be"):
        padded.scan(q, bounds, 2, np.array([True, False, False, False]))
    with pytest.raises(ValueError, match="row bounds must be for"):
        padded.scan(q, native_scan.RowBounds(np.ones(8), np.zeros(3), np.zeros(3), np.zeros(3)), 1)
    with pytest.raises(ValueError, match=r"\(8,\)"):
        padded.scan(np.ones(7, np.float32), bounds, 1)
    with pytest.raises(ValueError, match="contiguous float64"):
        native_scan.RowBounds(np.ones(8), np.zeros(4, np.float32), np.zeros(4), np.zeros(4))
    assert padded.scan(q, bounds, 4).rows.tolist() == [0, 1, 2, 3]


def test_row_scores_depend_on_the_row_alone():
    """float64 scores of listed float32 rows: the same for a row whatever else is listed, in any
    order, within float64 rounding of the exact sum; bad input refused."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=(50, 517)).astype(np.float32)
    q = rng.normal(size=517)
    alone = np.array([native_scan.row_scores(v, np.array([i]), q)[0] for i in range(50)])
    rows = rng.permutation(50)
    assert np.array_equal(native_scan.row_scores(v, rows, q), alone[rows])
    np.testing.assert_allclose(alone, v.astype(np.float64) @ q, rtol=1e-12, atol=1e-12)
    assert native_scan.row_scores(v, np.zeros(0, np.int64), q).shape == (0,)
    with pytest.raises(IndexError):
        native_scan.row_scores(v, np.array([50]), q)
    with pytest.raises(ValueError, match="float32"):
        native_scan.row_scores(v.astype(np.float64), np.array([0]), q)


def test_concurrent_scans_do_not_share_buffers():
    """Threads scanning one Int8Codes at once (the ranker's gRPC workers, the GIL released in the
    call) each get the answer a lone scan gives: the candidate buffers are per thread."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    n, d = 3000, 130
    codes = rng.integers(-127, 128, (n, d)).astype(np.int8)
    padded = native_scan.Int8Codes(codes)
    bounds = native_scan.RowBounds(rng.random(d) + 0.1, rng.random(n), rng.random(n) / 10, rng.random(n))
    queries = [rng.normal(size=d).astype(np.float32) for _ in range(24)]
    alone = [padded.scan(q, bounds, 5 + i).rows for i, q in enumerate(queries)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda iq: padded.scan(iq[1], bounds, 5 + iq[0]).rows, enumerate(queries)))
            assert all(np.array_equal(g, a) for g, a in zip(got, alone))


def test_top_rows_orders_by_score_then_id_and_leaves_out_damaged_rows(monkeypatch):
    """The best `limit` listed rows, score descending and ties by id (exact ties: repeated rows under
    other ids), a NaN row left out, ids through id_rows (a filter's block); numpy's fallback gives the
    same order."""
    rng = np.random.default_rng(11)
    v = rng.normal(size=(40, 70)).astype(np.float32)
    v[5] = v[3]  # an exact tie: ordered by id
    v[9, 4] = np.nan  # a damaged row
    q = rng.normal(size=70)
    ids = rng.permutation(1000)[:40].astype(np.int64)
    listed = rng.permutation(40)
    compiled = native_scan.top_rows(v, listed, ids, q, 12)
    with monkeypatch.context() as m:
        m.setattr(native_scan, "_library", lambda: None)
        fallback = native_scan.top_rows(v, listed, ids, q, 12)
    assert np.array_equal(compiled[0], fallback[0])
    np.testing.assert_allclose(compiled[1], fallback[1], rtol=1e-12)
    exact = v.astype(np.float64) @ q
    good = [r for r in listed if np.isfinite(exact[r])]
    want = sorted(good, key=lambda r: (-round(exact[r], 9), ids[r]))[:12]
    assert listed[compiled[0]].tolist() == want and 9 not in listed[compiled[0]]
    assert np.array_equal(compiled[1], native_scan.row_scores(v, listed[compiled[0]], q))
    # a block of vectors whose ids come through id_rows; every row, and more than there are
    block_rows = np.array([7, 3, 30, 5])
    at, _ = native_scan.top_rows(np.ascontiguousarray(v[block_rows]), np.arange(4), ids, q, 10, id_rows=block_rows)
    assert block_rows[at].tolist() == sorted(block_rows, key=lambda r: (-round(exact[r], 9), ids[r]))
    assert native_scan.top_rows(v, np.zeros(0, np.int64), ids, q, 5)[0].shape == (0,)
    with pytest.raises(IndexError):
        native_scan.top_rows(v, np.array([40]), ids, q, 5)
    with pytest.raises(IndexError):
        native_scan.top_rows(v[:4], np.arange(4), ids, q, 5, id_rows=np.array([0, 1, 2, 4000]))


def test_top_rows_kept_for_many_calls_answers_as_a_fresh_one():
    """A TopRows kept across calls (the ranker's, per block) gives each call what a fresh top_rows
    gives, as its scratch grows from 1 row to every row; an answer is a copy, not the scratch."""
    rng = np.random.default_rng(17)
    v = rng.normal(size=(300, 33)).astype(np.float32)
    ids = rng.permutation(5000)[:300].astype(np.int64)
    kept = native_scan.TopRows(v, ids)
    first = None
    for m in (1, 5, 64, 65, 300, 3):
        listed = rng.permutation(300)[:m]
        q = rng.normal(size=33)
        got, want = kept(listed, q, 10), native_scan.top_rows(v, listed, ids, q, 10)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        if first is None:
            first = (got, tuple(a.copy() for a in got))
    assert all(np.array_equal(a, b) for a, b in zip(*first))  # later calls did not overwrite it
    with pytest.raises(IndexError):
        native_scan.TopRows(v, ids[:10])


def test_search_is_candidates_then_top_rows_in_one_call():
    """Int8Codes.search gives what candidates and top_rows give one after the other (bundle rows and
    their scores), and None past max_cands."""
    rng = np.random.default_rng(13)
    n, d = 700, 100
    v = rng.normal(size=(n, d)).astype(np.float32)
    scale = np.abs(v).max(axis=0).astype(np.float64) / 127
    codes = np.clip(np.rint(v / scale), -127, 127)
    residual = np.linalg.norm(v - codes * scale, axis=1)
    padded = native_scan.Int8Codes(codes.astype(np.int8))
    bounds = native_scan.RowBounds(scale, residual, np.full(n, 1e-6), np.linalg.norm(codes, axis=1))
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    source = native_scan.RowSource(v, ids)
    for i in range(5):
        q = v[rng.integers(0, n, 3)].mean(axis=0)
        eligible = None if i % 2 else rng.random(n) < 0.8
        cand = padded.candidates(q, bounds, 7, eligible)
        at, scores = native_scan.top_rows(v, cand, ids, q, 7)
        got = padded.search(q, bounds, 7, eligible, source, 7, n)
        assert got is not None and np.array_equal(got[0], cand[at]) and np.array_equal(got[1], scores)
        assert padded.search(q, bounds, 7, eligible, source, 7, len(cand) - 1) is None
    with pytest.raises(ValueError, match="source vectors"):
        padded.search(q, bounds, 7, None, native_scan.RowSource(v[:10], ids[:10]), 7, n)
    # the ranker's form: one call of the library's Python entry point, (id, score, row) tuples
    searcher = padded.searcher(bounds, source)
    rows, scores = padded.search(q, bounds, 7, None, source, 7, n)
    assert searcher.records(q, 7, None, 7, n) == list(zip(ids[rows].tolist(), scores.tolist(), rows.tolist()))
    assert searcher.records(np.full(d, np.nan, np.float32), 7, None, 7, n) == []  # nothing ranks against it
    for bad in (q.astype(np.float64), q[:50]):
        with pytest.raises(ValueError, match=rf"\({d},\) float32"):
            searcher.records(bad, 7, None, 7, n)
    with pytest.raises(ValueError, match="not C-contiguous"):  # numpy's refusal of the buffer
        searcher.records(np.ascontiguousarray(np.stack([q, q]).T)[:, 0], 7, None, 7, n)
    with pytest.raises(ValueError, match="eligible"):
        searcher.records(q, 7, np.ones(n - 1, np.bool_), 7, n)
    for k in (0, n + 1):
        with pytest.raises(ValueError, match="k must be"):
            searcher.records(q, k, None, 7, n)
    with pytest.raises(ValueError, match="k must be"):  # fewer eligible rows than k
        searcher.records(q, 7, np.arange(n) < 3, 7, n)

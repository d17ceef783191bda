/* The ranker's in-memory scan (services/ranker/memory_scan.py): exact int8 dot products of every
 * stored row with two query rows, the bounded top-k candidates in the same pass, and the float64
 * rescoring of the candidates. torch's _int_mm is a general matrix product: for two query rows
 * it spends ~2.5x the time of one read of the codes. This kernel streams each row once and keeps
 * the query in registers, with AVX-512 VNNI (vpdpbusd: 64 unsigned-by-signed byte products summed
 * into 16 int32 lanes per instruction).
 *
 * Layout (anime2vec/native/scan.py, `a2v_rows`): each row's whole 64-byte chunks in `main`, 64-byte
 * aligned, and its d % 64 columns left in a slot of `tail`; the query shifted to unsigned (q + 128,
 * 128 past d) because vpdpbusd multiplies unsigned by signed, and 128 * (row sum) subtracted again.
 * Every sum is exact in int32: |codes| <= 127, q + 128 <= 255 and at most 4096 columns give
 * |sum| < 2^31.
 *
 * The int8 entry points share one product loop (`dot4`): a2v_int8_dot2 returns the products (the
 * load-time probe, torch-free tests); a2v_int8_scan also rounds the query, applies the scan's error
 * bound and keeps, in the same pass, the k-th best lower bound and the rows that can reach it (numpy
 * over the products cost as much as the products); a2v_int8_search adds the float64 rescoring and
 * ordering (a2v_rows_top, plain C like a2v_rows_dot: any x86-64 CPU).
 *
 * Built with -ffp-contract=off: the bound arithmetic rounds as numpy's (no fused multiply-add).
 * Loaded with ctypes (every entry point above), and imported for one: `search` (at the end), the
 * ranker's call per request, which a ctypes call made 0.05 ms slower with a cold cache. */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python.h asks */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <immintrin.h>

#define A2V_MAX_CHUNKS 64 /* 64 x 64 bytes: up to 4096 columns */

int a2v_int8_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

int a2v_int8_max_width(void) { return 64 * A2V_MAX_CHUNKS; }

#define A2V_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

#define A2V_INLINE static inline __attribute__((always_inline)) A2V_TARGET

/* One row against one query row: two accumulators (even and odd chunks) keep two products in flight;
 * the lanes are summed later, four rows at a time. A row is `full` whole chunks of 64 bytes in
 * `main` (64-byte aligned: no load splits a cache line) and, for the d % 64 columns left, a slot in
 * `tail`, read through `tmask` (no padding read: 516 columns padded to 576 read 12% more bytes than
 * the codes hold). With no software prefetch (dot4) this layout measured 1.0-1.07x the int8 read
 * floor with a cold cache, the padded rows 1.24-1.65x in the same runs. Always inlined with `full` a constant (see A2V_EACH), so the query's chunks stay in
 * registers: loaded from memory for every row they took more load slots than the codes (1.2x
 * slower, measured). */
A2V_INLINE __m512i dot_row(const int8_t *restrict main, const int8_t *restrict tail, const size_t full,
                           const __m512i *q, const __mmask64 tmask) {
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    size_t c = 0;
    for (; c + 2 <= full; c += 2) {
        a = _mm512_dpbusd_epi32(a, q[c], _mm512_load_si512(main + 64 * c));
        b = _mm512_dpbusd_epi32(b, q[c + 1], _mm512_load_si512(main + 64 * c + 64));
    }
    if (c < full) a = _mm512_dpbusd_epi32(a, q[c], _mm512_load_si512(main + 64 * c));
    if (tmask) b = _mm512_dpbusd_epi32(b, q[full], _mm512_maskz_loadu_epi8(tmask, tail));
    return _mm512_add_epi32(a, b);
}

/* The lane sums of four vectors at once (a transposing add tree: ~10 instructions where four
 * separate reductions take ~36). */
A2V_INLINE __m128i sum4(const __m512i *v) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    /* per 128-bit lane: (v0, v1, v2, v3) partial sums; then the four lanes added */
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m512i z = _mm512_add_epi32(u, _mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_castsi512_si128(_mm512_add_epi32(z, _mm512_shuffle_i32x4(z, z, _MM_SHUFFLE(2, 3, 0, 1))));
}

/* The bytes of a row's slot in `tail` for d columns: d % 64 rounded up to a power of two (a slot
 * then never crosses a cache line), 0 when d is whole chunks. */
size_t a2v_int8_tail_bytes(size_t d) {
    size_t t = d % 64, s = t ? 1 : 0;
    while (s < t) s *= 2;
    return s;
}

/* The codes' layout for d columns (`tmask`: the tail slot's bytes that are columns; 0 without a
 * tail). */
typedef struct {
    const int8_t *main, *tail;
    size_t full, d, slot;
    __mmask64 tmask;
} a2v_rows;

static inline a2v_rows rows_of(const int8_t *main, const int8_t *tail, size_t d) {
    a2v_rows r = {main, tail, d / 64, d, a2v_int8_tail_bytes(d), 0};
    r.tmask = d % 64 ? (((__mmask64)1) << (d % 64)) - 1 : 0;
    return r;
}

/* Rows i .. i + m - 1 (m <= 4) times one query row (unsigned-shifted), the shift taken back: four
 * int32 (zero past m). No software prefetch: with the rows aligned, the hardware's stream prefetcher
 * alone was fastest with a cold cache (prefetching 8-32 rows ahead: 1.1-1.2x slower, measured; it
 * had helped the unaligned rows before). */
A2V_INLINE __m128i dot4(const a2v_rows *x, size_t i, size_t m, const size_t full, const __m512i *q,
                        const int32_t *restrict rowsum128) {
    __m512i v[4];
    for (size_t r = 0; r < 4; r++)
        v[r] = r < m ? dot_row(x->main + (i + r) * 64 * full, x->tail + (i + r) * x->slot, full, q, x->tmask)
                     : _mm512_setzero_si512();
    int32_t shift[4] = {0, 0, 0, 0};
    memcpy(shift, rowsum128 + i, m * sizeof(int32_t));
    return _mm_sub_epi32(sum4(v), _mm_loadu_si128((const __m128i *)shift));
}

/* The query rows' bytes for d columns: the whole chunks and one more (the tail's, 128 past d). */
static inline size_t query_bytes(size_t d) { return 64 * (d / 64 + 1); }

/* The query's `full` + 1 chunks (a constant count: they stay in registers). */
A2V_INLINE void load_query(const size_t full, const uint8_t *qu, __m512i *q) {
    for (size_t c = 0; c <= full; c++) q[c] = _mm512_loadu_si512(qu + 64 * c);
}

A2V_INLINE void dot2_body(const a2v_rows *x, size_t n, const size_t full, const uint8_t *qu0, const uint8_t *qu1,
                          const int32_t *restrict rowsum128, int32_t *restrict out0, int32_t *restrict out1) {
    __m512i q0[A2V_MAX_CHUNKS + 1], q1[A2V_MAX_CHUNKS + 1];
    load_query(full, qu0, q0);
    load_query(full, qu1, q1);
    int32_t p[4];
    for (size_t i = 0; i < n; i += 4) {
        const size_t m = n - i < 4 ? n - i : 4;
        _mm_storeu_si128((__m128i *)p, dot4(x, i, m, full, q0, rowsum128));
        memcpy(out0 + i, p, m * sizeof(int32_t));
        _mm_storeu_si128((__m128i *)p, dot4(x, i, m, full, q1, rowsum128));
        memcpy(out1 + i, p, m * sizeof(int32_t));
    }
}

/* A min-heap of the k best lower bounds so far; heap[0] is the k-th best. */
static void sift_down(double *heap, size_t k, double v) {
    size_t j = 0;
    for (;;) {
        size_t c = 2 * j + 1;
        if (c >= k) break;
        if (c + 1 < k && heap[c + 1] < heap[c]) c++;
        if (heap[c] >= v) break;
        heap[j] = heap[c];
        j = c;
    }
    heap[j] = v;
}

static void sift_up(double *heap, size_t j, double v) {
    while (j > 0) {
        const size_t p = (j - 1) / 2;
        if (heap[p] <= v) break;
        heap[j] = heap[p];
        j = p;
    }
    heap[j] = v;
}

typedef struct {
    double w1, w2, qn, left1, left, l1, tau;
} a2v_bound;

/* Four doubles from p (m of them, zeros after: the last group of rows). */
A2V_INLINE __m256d load4(const double *restrict p, size_t m) {
    if (m == 4) return _mm256_loadu_pd(p);
    double t[4] = {0, 0, 0, 0};
    memcpy(t, p, m * sizeof(double));
    return _mm256_loadu_pd(t);
}

/* One pass of the scan (a2v_int8_scan); returns the rows kept against the running tau. Each group of
 * four rows is first multiplied by the query's first int8 row only: its bound, with that row's own
 * rounding (left1), already says whether any of the four can reach the running k-th lower bound, and
 * ~98% of rows cannot (the served vectors, favourites queries); only the others get the second
 * row's products, their codes still in the L1 cache. */
A2V_INLINE int64_t scan_body(const a2v_rows *x, size_t n, const size_t full, const uint8_t *qu0,
                             const uint8_t *qu1, const int32_t *restrict rowsum128, const double *restrict residual,
                             const double *restrict f32, const double *restrict code_norm,
                             const uint8_t *restrict eligible, size_t k, double *restrict heap,
                             int64_t *restrict cand, double *restrict upper, a2v_bound *b) {
    __m512i q0[A2V_MAX_CHUNKS + 1], q1[A2V_MAX_CHUNKS + 1];
    load_query(full, qu0, q0);
    load_query(full, qu1, q1);
    const __m256d w1 = _mm256_set1_pd(b->w1), w2 = _mm256_set1_pd(b->w2), qn = _mm256_set1_pd(b->qn);
    const __m256d left1 = _mm256_set1_pd(b->left1), left = _mm256_set1_pd(b->left), l1 = _mm256_set1_pd(b->l1);
    size_t filled = 0;
    int64_t kept = 0;
    double kth = -__builtin_inf(), lov[4], upv[4];
    for (size_t i = 0; i < n; i += 4) {
        const size_t m = n - i < 4 ? n - i : 4;
        const __m256d a1 = _mm256_mul_pd(_mm256_cvtepi32_pd(dot4(x, i, m, full, q0, rowsum128)), w1);
        const __m256d cs = _mm256_mul_pd(load4(residual + i, m), qn);
        const __m256d codes_err = _mm256_blendv_pd(l1, cs, _mm256_cmp_pd(cs, l1, _CMP_LT_OQ)); /* min(cs, l1) */
        const __m256d f32q = _mm256_mul_pd(load4(f32 + i, m), qn), norm = load4(code_norm + i, m);
        const __m256d s1 = _mm256_add_pd(codes_err, _mm256_add_pd(f32q, _mm256_mul_pd(norm, left1)));
        const __m256d up1 = _mm256_add_pd(a1, s1);
        uint32_t four = 0x01010101u; /* numpy bools are the bytes 0 and 1 */
        if (eligible != NULL) {
            four = 0;
            memcpy(&four, eligible + i, m);
        }
        if (filled >= k && m == 4 && four == 0x01010101u &&
            _mm256_movemask_pd(_mm256_cmp_pd(up1, _mm256_set1_pd(kth), _CMP_GE_OQ)) == 0)
            continue; /* none of the four can reach the k-th best lower bound, nor enter the heap */
        const __m256d p2 = _mm256_cvtepi32_pd(dot4(x, i, m, full, q1, rowsum128));
        const __m256d a = _mm256_add_pd(a1, _mm256_mul_pd(p2, w2)); /* w1 * p1 + w2 * p2 */
        const __m256d s = _mm256_add_pd(codes_err, _mm256_add_pd(f32q, _mm256_mul_pd(norm, left)));
        /* both intervals hold the score: their intersection. Kept ordered (lo <= up1, up >= lo) even
         * for bounds that failed, so skipping on up1 alone stays exact and the k rows that set tau
         * are always kept; with bounds that hold, both clamps change nothing. */
        const __m256d lo = _mm256_min_pd(_mm256_max_pd(_mm256_sub_pd(a1, s1), _mm256_sub_pd(a, s)), up1);
        _mm256_storeu_pd(lov, lo);
        _mm256_storeu_pd(upv, _mm256_max_pd(_mm256_min_pd(up1, _mm256_add_pd(a, s)), lo));
        for (size_t r = 0; r < m; r++) {
            const size_t row = i + r;
            if (eligible != NULL && !eligible[row]) continue;
            const double lo = lov[r], up = upv[r];
            if (filled < k) {
                sift_up(heap, filled++, lo);
                if (filled == k) kth = heap[0];
            } else if (lo > kth) {
                sift_down(heap, k, lo);
                kth = heap[0];
            }
            if (up >= kth) {
                cand[kept] = (int64_t)row;
                upper[kept++] = up;
            }
        }
    }
    if (filled < k) return -2;
    b->tau = kth;
    return kept;
}

/* Kernels for 0 .. 12 whole chunks (up to 831 columns), with the query in registers; wider rows
 * run the same code with the query in memory. */
#define A2V_EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)
#define A2V_DOT2(C)                                                                                 \
    static A2V_TARGET void dot2_##C(const a2v_rows *x, size_t n, const uint8_t *qu0, const uint8_t *qu1, \
                                    const int32_t *rowsum128, int32_t *out0, int32_t *out1) {         \
        dot2_body(x, n, C, qu0, qu1, rowsum128, out0, out1);                                          \
    }
#define A2V_SCAN(C)                                                                                          \
    static A2V_TARGET int64_t scan_##C(const a2v_rows *x, size_t n, const uint8_t *qu0, const uint8_t *qu1,   \
                                       const int32_t *rowsum128, const double *residual, const double *f32,   \
                                       const double *code_norm, const uint8_t *eligible, size_t k,            \
                                       double *heap, int64_t *cand, double *upper, a2v_bound *b) {            \
        return scan_body(x, n, C, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand,      \
                         upper, b);                                                                           \
    }
A2V_EACH(A2V_DOT2)
A2V_EACH(A2V_SCAN)

/* The products of n rows of d columns (laid out as `a2v_rows` says: `main` 64-byte aligned, n rows
 * of 64 * (d / 64) bytes; `tail` n slots of a2v_int8_tail_bytes(d), NULL when that is 0) with two
 * query rows of query_bytes(d) bytes, unsigned-shifted (the bytes past d: 128). Returns -1 for a
 * width it cannot run or a `main` that is not aligned. */
A2V_TARGET int a2v_int8_dot2(const int8_t *main, const int8_t *tail, size_t n, size_t d,
                             const uint8_t *restrict qu0, const uint8_t *restrict qu1,
                             const int32_t *restrict rowsum128, int32_t *restrict out0, int32_t *restrict out1) {
    if (d == 0 || d > 64 * A2V_MAX_CHUNKS || (n && d >= 64 && (uintptr_t)main % 64 != 0)) return -1;
    const a2v_rows x = rows_of(main, tail, d);
    switch (x.full) {
#define A2V_CASE(C)                                           \
    case C:                                                   \
        dot2_##C(&x, n, qu0, qu1, rowsum128, out0, out1);     \
        return 0;
        A2V_EACH(A2V_CASE)
#undef A2V_CASE
        default:
            dot2_body(&x, n, x.full, qu0, qu1, rowsum128, out0, out1);
            return 0;
    }
}

static double unit(double top) { return top > 0 ? top / 127.0 : 1.0; }

static double round127(double v) {
    const double r = __builtin_nearbyint(v); /* half to even, as numpy's rint */
    return r > 127 ? 127 : (r < -127 ? -127 : r);
}

/* The query's side of the scan (services/ranker/memory_scan.py, Int8Copy._query, in numpy): c ⊙ q
 * rounded to int8 twice (the codes, then their remainder), shifted to unsigned for vpdpbusd; the
 * weights w1, w2, ‖q‖ and ‖c ⊙ q − its rounding‖ into b. 0 for a query that is not finite. */
static int round_query(const float *restrict query, size_t d, const double *restrict scale,
                       int8_t *restrict qrows, uint8_t *restrict qu0, uint8_t *restrict qu1, a2v_bound *b) {
    double top = 0, nq = 0, l1 = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], a = v < 0 ? -v : v;
        top = a > top ? a : top;
        nq += (double)query[j] * (double)query[j];
        l1 += 0.5 * a; /* sum of c_j / 2 * |q_j|: each code is within c_j / 2 of its value */
    }
    if (!(nq <= __DBL_MAX__)) return 0; /* an infinity or a NaN in the query (float32 values cannot overflow nq) */
    const double b1 = unit(top);
    double top2 = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], rest = v - round127(v / b1) * b1, a = rest < 0 ? -rest : rest;
        top2 = a > top2 ? a : top2;
    }
    const double b2 = unit(top2);
    double left = 0, left1 = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], r1 = round127(v / b1), rest = v - r1 * b1;
        const double r2 = round127(rest / b2), e = rest - r2 * b2;
        left1 += rest * rest;
        left += e * e;
        qrows[j] = (int8_t)r1;
        qrows[d + j] = (int8_t)r2;
        qu0[j] = (uint8_t)(r1 + 128);
        qu1[j] = (uint8_t)(r2 + 128);
    }
    for (size_t j = d; j < query_bytes(d); j++) qu0[j] = qu1[j] = 128; /* past the row: masked to 0 */
    b->w1 = b1;
    b->w2 = b2;
    b->qn = __builtin_sqrt(nq);
    b->left1 = __builtin_sqrt(left1);
    b->left = __builtin_sqrt(left);
    b->l1 = l1;
    return 1;
}

/* The scan's candidates in one pass over the codes. The query (float32, d values) is rounded as
 * `round_query` says (its int8 rows into qrows, 2 x d; w1, w2, qn, left, l1, tau, left1 into
 * bound[0..6]). With p1, p2 the exact products of row i with the two rows and
 * e_i = min(residual[i] * qn, l1) + f32[i] * qn (l1, the sum of c_j / 2 * |q_j|, bounds the codes' error
 * as Cauchy-Schwarz's residual[i] * qn does, and is ~6x tighter on the served vectors), the row's
 * score lies in w1 * p1 +- (e_i + code_norm[i] * left1) and in w1 * p1 + w2 * p2 +- (e_i + code_norm[i]
 * * left); lo_i, up_i are the ends of their intersection (kept ordered: scan_body). tau is the k-th
 * best lo_i over the eligible rows (eligible NULL: all), and the candidates are the eligible rows with
 * up_i >= tau, written ascending to cand (room for n; `upper` and `heap`, n and k doubles, are
 * scratch). tau only grows during the pass, so the rows kept against the running tau are a superset,
 * cut at the final tau at the end. Returns the number of candidates; -1 for a width it cannot run,
 * -2 for k = 0 or fewer eligible rows than k, -4 for a query that is not finite. */
A2V_TARGET int64_t a2v_int8_scan(const int8_t *main, const int8_t *tail, size_t n, size_t d,
                                 const int32_t *restrict rowsum128, const float *restrict query,
                                 const double *restrict scale, const double *restrict residual,
                                 const double *restrict f32, const double *restrict code_norm,
                                 const uint8_t *restrict eligible, size_t k, double *restrict heap,
                                 int64_t *restrict cand, double *restrict upper, int8_t *restrict qrows,
                                 double *restrict bound) {
    if (d == 0 || d > 64 * A2V_MAX_CHUNKS || (n && d >= 64 && (uintptr_t)main % 64 != 0)) return -1;
    if (k == 0) return -2;
    uint8_t qu0[64 * (A2V_MAX_CHUNKS + 1)] __attribute__((aligned(64)));
    uint8_t qu1[64 * (A2V_MAX_CHUNKS + 1)] __attribute__((aligned(64)));
    a2v_bound b;
    if (!round_query(query, d, scale, qrows, qu0, qu1, &b)) return -4;
    const a2v_rows x = rows_of(main, tail, d);
    int64_t kept;
    switch (x.full) {
#define A2V_CASE(C)                                                                                           \
    case C:                                                                                                   \
        kept = scan_##C(&x, n, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand, upper, &b); \
        break;
        A2V_EACH(A2V_CASE)
#undef A2V_CASE
        default:
            kept = scan_body(&x, n, x.full, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand,
                             upper, &b);
    }
    if (kept < 0) return kept;
    int64_t m = 0;
    for (int64_t j = 0; j < kept; j++)
        if (upper[j] >= b.tau) cand[m++] = cand[j];
    bound[0] = b.w1;
    bound[1] = b.w2;
    bound[2] = b.qn;
    bound[3] = b.left;
    bound[4] = b.l1;
    bound[5] = b.tau;
    bound[6] = b.left1;
    return m;
}


/* A row's dot product with q in float64, summed in one fixed order (eight running sums over the
 * columns, added pairwise), so a row's score depends on that row alone, never on which other rows are
 * scored with it. Plain C: any x86-64 CPU; -ffp-contract=off keeps the order. */
static inline double row_dot(const float *restrict x, size_t d, const double *restrict q) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t j = 0;
    for (; j + 8 <= d; j += 8)
        for (size_t l = 0; l < 8; l++) s[l] += (double)x[j + l] * q[j + l];
    for (size_t l = 0; j < d; j++, l++) s[l] += (double)x[j] * q[j];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* The listed rows are scattered: fetch the one two ahead (1.6x faster from memory, measured). */
static inline void fetch_ahead(const float *vectors, size_t d, const int64_t *rows, size_t r, size_t m) {
    if (r + 2 < m) {
        const char *ahead = (const char *)(vectors + (size_t)rows[r + 2] * d);
        for (size_t c = 0; c < d * sizeof(float); c += 64) __builtin_prefetch(ahead + c);
    }
}

void a2v_rows_dot(const float *restrict vectors, size_t d, const int64_t *restrict rows, size_t m,
                  const double *restrict q, double *restrict out) {
    for (size_t r = 0; r < m; r++) {
        fetch_ahead(vectors, d, rows, r, m);
        out[r] = row_dot(vectors + (size_t)rows[r] * d, d, q);
    }
}

typedef struct {
    double score;
    int64_t id, at;
} a2v_hit;

static int best_first(const void *a, const void *b) {
    const a2v_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The listed rows scored as a2v_rows_dot scores them, and the best `limit` of them in order: score
 * descending, ties by id ascending (ids[id_rows ? id_rows[rows[r]] : rows[r]]); rows whose score is
 * NaN or -inf (a damaged row) are left out. Writes the positions r into `at` and their scores into
 * `out` (room for min(m, limit) each; `hits` is scratch for m); returns how many. */
int64_t a2v_rows_top(const float *restrict vectors, size_t d, const int64_t *restrict rows, size_t m,
                     const int64_t *restrict id_rows, const int64_t *restrict ids, const double *restrict q,
                     size_t limit, a2v_hit *restrict hits, int64_t *restrict at, double *restrict out) {
    size_t kept = 0;
    for (size_t r = 0; r < m; r++) {
        fetch_ahead(vectors, d, rows, r, m);
        const double score = row_dot(vectors + (size_t)rows[r] * d, d, q);
        if (!(score > -__builtin_inf())) continue;
        const int64_t row = rows[r];
        hits[kept].score = score;
        hits[kept].id = ids[id_rows != NULL ? id_rows[row] : row];
        hits[kept++].at = (int64_t)r;
    }
    qsort(hits, kept, sizeof(a2v_hit), best_first);
    const size_t n = kept < limit ? kept : limit;
    for (size_t i = 0; i < n; i++) {
        at[i] = hits[i].at;
        out[i] = hits[i].score;
    }
    return (int64_t)n;
}

/* A whole search over the codes in one call: a2v_int8_scan's candidates (the first 17 arguments, as
 * there; more than max_cands of them: -3, and the caller scans float32 instead), then a2v_rows_top
 * over them on the float32 vectors the codes were made from (n x d), with ids[row]. Writes the best
 * min(limit, candidates) bundle rows to rows_out and their scores to scores_out (hits: scratch for n);
 * returns how many, or a2v_int8_scan's error. The candidates' rows are not prefetched as the pass keeps
 * them: it keeps ~100 against the running tau for the ~26 left at the end (top-11, the served vectors),
 * and fetching them all made the whole call 1.05-1.08x slower with a cold cache (measured side by side);
 * the rescoring's own fetch two rows ahead costs ~15 us for those 26 rows from memory. */
int64_t a2v_int8_search(const int8_t *main, const int8_t *tail, size_t n, size_t d, const int32_t *rowsum128,
                        const float *query,
                        const double *scale, const double *residual, const double *f32, const double *code_norm,
                        const uint8_t *eligible, size_t k, double *heap, int64_t *cand, double *upper, int8_t *qrows,
                        double *bound, const float *vectors, const int64_t *ids, size_t limit, size_t max_cands,
                        a2v_hit *hits, int64_t *rows_out, double *scores_out) {
    const int64_t m = a2v_int8_scan(main, tail, n, d, rowsum128, query, scale, residual, f32, code_norm, eligible, k, heap,
                                cand, upper, qrows, bound);
    if (m < 0) return m;
    if ((size_t)m > max_cands) return -3;
    double q64[64 * A2V_MAX_CHUNKS]; /* the query as float64: exactly numpy's query.astype(float64) */
    for (size_t j = 0; j < d; j++) q64[j] = (double)query[j];
    const int64_t got = a2v_rows_top(vectors, d, cand, (size_t)m, NULL, ids, q64, limit, hits, rows_out, scores_out);
    for (int64_t i = 0; i < got; i++) rows_out[i] = cand[rows_out[i]];
    return got;
}

/* ---- the Python entry point --------------------------------------------------------------------
 * search(fixed, scratch, query, eligible, k, limit, max_cands) -> [(id, score, row), ...] | None
 *   fixed: the addresses and sizes a2v_int8_search reads and never writes, in its order (main, tail,
 *     n, d, rowsum128, scale, residual, f32, code_norm, vectors, ids), checked by the caller
 *     (anime2vec/native/scan.py Int8Search) and kept alive by it;
 *   scratch: this thread's buffers (heap, cand, upper, qrows, bound, hits, rows_out, scores_out), room
 *     for k and n as the caller sized them;
 *   query: a C-contiguous float32 buffer of d values; eligible: None or n bytes (numpy bools).
 * Returns the best min(limit, candidates) as (ids[row], float64 score, row) tuples, best first; None
 * when more than max_cands rows are candidates; [] for a query that is not finite (nothing ranks
 * against it: the ranker's rule, services/ranker/memory_scan.py, checked here instead of in numpy). One call: a ctypes call of the 25 arguments cost ~0.05
 * ms of the search's 0.3 with a cold cache (its conversions and libffi), and the answer's three numpy
 * arrays, their copies and tolist() calls more again. */
static int addresses(PyObject *tuple, Py_ssize_t count, void **out, const char *what) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != count) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of %zd integers", what, count);
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        out[i] = item == Py_None ? NULL : PyLong_AsVoidPtr(item);
        if (out[i] == NULL && PyErr_Occurred()) return 0;
    }
    return 1;
}

static PyObject *py_search(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "search takes 7 arguments");
        return NULL;
    }
    void *fixed[11], *scratch[8];
    if (!addresses(args[0], 11, fixed, "fixed") || !addresses(args[1], 8, scratch, "scratch")) return NULL;
    const size_t n = (size_t)fixed[2], d = (size_t)fixed[3];
    const Py_ssize_t k = PyLong_AsSsize_t(args[4]), limit = PyLong_AsSsize_t(args[5]),
                     max_cands = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (k < 1 || (size_t)k > n) return PyErr_Format(PyExc_ValueError, "k must be between 1 and the number of eligible rows, got %zd", k);
    Py_buffer query, eligible = {0};
    if (PyObject_GetBuffer(args[2], &query, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    PyObject *result = NULL;
    if (query.itemsize != 4 || query.format == NULL || strcmp(query.format, "f") != 0 || (size_t)query.len != 4 * d) {
        PyErr_Format(PyExc_ValueError, "the query must be (%zu,) float32", d);
        goto done_query;
    }
    if (args[3] != Py_None) {
        if (PyObject_GetBuffer(args[3], &eligible, PyBUF_C_CONTIGUOUS) < 0) goto done_query;
        if ((size_t)eligible.len != n) {
            PyErr_Format(PyExc_ValueError, "eligible must be (%zu,) bools", n);
            goto done;
        }
    }
    int64_t got;
    Py_BEGIN_ALLOW_THREADS; /* the pass reads only memory the caller keeps alive and this thread's scratch */
    got = a2v_int8_search(fixed[0], fixed[1], n, d, fixed[4], query.buf, fixed[5], fixed[6], fixed[7], fixed[8],
                          eligible.buf, (size_t)k, scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], fixed[9],
                          fixed[10], limit < 0 ? 0 : (size_t)limit, max_cands < 0 ? 0 : (size_t)max_cands, scratch[5],
                          scratch[6], scratch[7]);
    Py_END_ALLOW_THREADS;
    if (got == -3) {
        result = Py_NewRef(Py_None);
    } else if (got == -2) {
        PyErr_Format(PyExc_ValueError, "k must be between 1 and the number of eligible rows, got %zd", k);
    } else if (got == -4) {
        result = PyList_New(0);
    } else if (got < 0) {
        PyErr_Format(PyExc_RuntimeError, "a2v_int8_scan refused width %zu", d);
    } else if ((result = PyList_New(got)) != NULL) {
        const int64_t *rows = scratch[6], *ids = fixed[10];
        const double *scores = scratch[7];
        for (int64_t i = 0; i < got; i++) {
            PyObject *hit = Py_BuildValue("(LdL)", (long long)ids[rows[i]], scores[i], (long long)rows[i]);
            if (hit == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, i, hit);
        }
    }
done:
    if (eligible.obj != NULL) PyBuffer_Release(&eligible);
done_query:
    PyBuffer_Release(&query);
    return result;
}

static PyMethodDef methods[] = {
    {"search", (PyCFunction)(void (*)(void))py_search, METH_FASTCALL, "The ranker's int8 search (see scan.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }

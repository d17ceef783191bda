/* The ranker's in-memory scan (services/ranker/memory_scan.py): exact int8 dot products of every
 * stored row with two query rows, the bounded top-k candidates in the same pass, and the float64
 * rescoring of the candidates. torch's _int_mm is a general matrix product: for two query rows
 * it spends ~2.5x the time of one read of the codes. This kernel streams each row once and keeps
 * the query in registers, with AVX-512 VNNI (vpdpbusd: 64 unsigned-by-signed byte products summed
 * into 16 int32 lanes per instruction).
 *
 * Layout (anime2vec/native/scan.py): rows padded with zeros to a stride that is a multiple of 64
 * bytes; the query shifted to unsigned (q + 128, padding 128) because vpdpbusd multiplies unsigned
 * by signed, and 128 * (row sum) subtracted again. Every sum is exact in int32: |codes| <= 127,
 * q + 128 <= 255 and at most 4096 columns give |sum| < 2^31.
 *
 * Two entry points share one product loop (`dot_rows4`): a2v_int8_dot2 returns the products;
 * a2v_int8_scan also applies the scan's error bound and keeps, in the same pass, the k-th best lower
 * bound and the rows that can reach it (numpy over the products cost as much as the products).
 *
 * Built with -ffp-contract=off: the bound arithmetic rounds as numpy's (no fused multiply-add).
 * Loaded with ctypes, not imported: the library has no Python entry point. */
#include <stddef.h>
#include <string.h>
#include <stdint.h>
#include <immintrin.h>

#define A2V_MAX_CHUNKS 64 /* 64 x 64 bytes: up to 4096 columns */
#define A2V_PREFETCH_ROWS 16

int a2v_int8_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

int a2v_int8_max_stride(void) { return 64 * A2V_MAX_CHUNKS; }

#define A2V_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* One row against both query rows: two accumulators per query row (even and odd chunks) keep two
 * products in flight; the lanes are summed later, four rows at a time. Always inlined with `chunks`
 * a constant (see A2V_SPECIALISED), so the query's chunks stay in registers: loaded from memory for
 * every row they took more load slots than the codes (1.2x slower, measured). */
static inline __attribute__((always_inline)) A2V_TARGET void dot_row(const int8_t *restrict row, const size_t chunks,
                                                                     const __m512i *q0, const __m512i *q1,
                                                                     __m512i *s0, __m512i *s1) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
    size_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
        const __m512i x = _mm512_loadu_si512(row + 64 * c), y = _mm512_loadu_si512(row + 64 * c + 64);
        a0 = _mm512_dpbusd_epi32(a0, q0[c], x);
        a1 = _mm512_dpbusd_epi32(a1, q1[c], x);
        b0 = _mm512_dpbusd_epi32(b0, q0[c + 1], y);
        b1 = _mm512_dpbusd_epi32(b1, q1[c + 1], y);
    }
    if (c < chunks) {
        const __m512i x = _mm512_loadu_si512(row + 64 * c);
        a0 = _mm512_dpbusd_epi32(a0, q0[c], x);
        a1 = _mm512_dpbusd_epi32(a1, q1[c], x);
    }
    *s0 = _mm512_add_epi32(a0, b0);
    *s1 = _mm512_add_epi32(a1, b1);
}

/* The lane sums of eight vectors at once (a transposing add tree: ~24 instructions where eight
 * separate reductions take ~70). */
static inline __attribute__((always_inline)) A2V_TARGET __m256i sum8(const __m512i *v) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    const __m512i t2 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[4], v[5]), _mm512_unpackhi_epi32(v[4], v[5]));
    const __m512i t3 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[6], v[7]), _mm512_unpackhi_epi32(v[6], v[7]));
    /* per 128-bit lane: u0 = (v0, v1, v2, v3) partial sums, u1 = (v4 .. v7) */
    const __m512i u0 = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m512i u1 = _mm512_add_epi32(_mm512_unpacklo_epi64(t2, t3), _mm512_unpackhi_epi64(t2, t3));
    /* lanes (u0.0 + u0.1, u0.2 + u0.3, u1.0 + u1.1, u1.2 + u1.3) */
    const __m512i y = _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i z = _mm512_shuffle_i32x4(y, y, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64(z, 1));
}

/* Rows i .. i + m - 1 (m <= 4): out[2r], out[2r + 1] = row i + r times query rows 0 and 1. */
static inline __attribute__((always_inline)) A2V_TARGET void dot_rows4(
    const int8_t *restrict codes, size_t i, size_t m, const size_t chunks, const __m512i *q0, const __m512i *q1,
    const int32_t *restrict rowsum128, int32_t *out) {
    const size_t stride = 64 * chunks;
    __m512i v[8];
    for (size_t r = 0; r < 4; r++) {
        if (r < m) {
            /* the row 16 ahead: the hardware prefetcher alone left the products waiting on memory
             * (1.2x faster with a cold cache, measured; a prefetch past the end is harmless) */
            for (size_t c = 0; c < chunks; c++)
                _mm_prefetch((const char *)(codes + (i + r + A2V_PREFETCH_ROWS) * stride + 64 * c), _MM_HINT_T0);
            dot_row(codes + (i + r) * stride, chunks, q0, q1, &v[2 * r], &v[2 * r + 1]);
        } else {
            v[2 * r] = v[2 * r + 1] = _mm512_setzero_si512();
        }
    }
    _mm256_storeu_si256((__m256i *)out, sum8(v));
    for (size_t r = 0; r < m; r++) {
        out[2 * r] -= rowsum128[i + r];
        out[2 * r + 1] -= rowsum128[i + r];
    }
}

static inline __attribute__((always_inline)) A2V_TARGET void load_query(const size_t chunks, const uint8_t *qu0,
                                                                        const uint8_t *qu1, __m512i *q0,
                                                                        __m512i *q1) {
    for (size_t c = 0; c < chunks; c++) {
        q0[c] = _mm512_loadu_si512(qu0 + 64 * c);
        q1[c] = _mm512_loadu_si512(qu1 + 64 * c);
    }
}

static inline __attribute__((always_inline)) A2V_TARGET void dot2_body(const int8_t *restrict codes, size_t n,
                                                                       const size_t chunks, const uint8_t *qu0,
                                                                       const uint8_t *qu1,
                                                                       const int32_t *restrict rowsum128,
                                                                       int32_t *restrict out0,
                                                                       int32_t *restrict out1) {
    __m512i q0[A2V_MAX_CHUNKS], q1[A2V_MAX_CHUNKS];
    load_query(chunks, qu0, qu1, q0, q1);
    int32_t out[8];
    for (size_t i = 0; i < n; i += 4) {
        const size_t m = n - i < 4 ? n - i : 4;
        dot_rows4(codes, i, m, chunks, q0, q1, rowsum128, out);
        for (size_t r = 0; r < m; r++) {
            out0[i + r] = out[2 * r];
            out1[i + r] = out[2 * r + 1];
        }
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
    double w1, w2, qn, left, l1, tau;
} a2v_bound;

/* One pass of the scan (a2v_int8_scan); returns the rows kept against the running tau. */
static inline __attribute__((always_inline)) A2V_TARGET int64_t scan_body(
    const int8_t *restrict codes, size_t n, const size_t chunks, const uint8_t *qu0, const uint8_t *qu1,
    const int32_t *restrict rowsum128, const double *restrict residual, const double *restrict f32,
    const double *restrict code_norm, const uint8_t *restrict eligible, size_t k, double *restrict heap,
    int64_t *restrict cand, double *restrict upper, a2v_bound *b) {
    __m512i q0[A2V_MAX_CHUNKS], q1[A2V_MAX_CHUNKS];
    load_query(chunks, qu0, qu1, q0, q1);
    const double w1 = b->w1, w2 = b->w2, qn = b->qn, left = b->left, l1 = b->l1;
    int32_t out[8];
    size_t filled = 0;
    int64_t kept = 0;
    double kth = -__builtin_inf();
    const __m512d w = _mm512_set_pd(w2, w1, w2, w1, w2, w1, w2, w1);
    const __m512i even = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
    const __m256d qnv = _mm256_set1_pd(qn), leftv = _mm256_set1_pd(left), l1v = _mm256_set1_pd(l1);
    double av[4], sv[4];
    for (size_t i = 0; i < n; i += 4) {
        const size_t m = n - i < 4 ? n - i : 4;
        dot_rows4(codes, i, m, chunks, q0, q1, rowsum128, out);
        if (m < 4) {
            for (size_t r = 0; r < m; r++) {
                av[r] = (double)out[2 * r] * w1 + (double)out[2 * r + 1] * w2;
                const double cs = residual[i + r] * qn;
                sv[r] = (cs < l1 ? cs : l1) + (f32[i + r] * qn + code_norm[i + r] * left);
            }
        } else {
            /* four rows at once, the same roundings as the scalar a_i and s_i (a product, then a sum);
             * most rows can neither enter the top k nor reach it, and are done here */
            const __m512d p = _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)out));
            const __m512d pw = _mm512_permutexvar_pd(even, _mm512_mul_pd(p, w)); /* w1 * p1 | w2 * p2 */
            const __m256d a = _mm256_add_pd(_mm512_castpd512_pd256(pw), _mm512_extractf64x4_pd(pw, 1));
            const __m256d cs = _mm256_mul_pd(_mm256_loadu_pd(residual + i), qnv);
            const __m256d sl = _mm256_add_pd(_mm256_blendv_pd(l1v, cs, _mm256_cmp_pd(cs, l1v, _CMP_LT_OQ)),
                                             _mm256_add_pd(_mm256_mul_pd(_mm256_loadu_pd(f32 + i), qnv),
                                                           _mm256_mul_pd(_mm256_loadu_pd(code_norm + i), leftv)));
            uint32_t four = 0x01010101u; /* numpy bools are the bytes 0 and 1 */
            if (eligible != NULL) memcpy(&four, eligible + i, 4);
            if (filled >= k && four == 0x01010101u) {
                const __m256d kv = _mm256_set1_pd(kth);
                const int enter = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_sub_pd(a, sl), kv, _CMP_GT_OQ));
                const int reach = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_add_pd(a, sl), kv, _CMP_GE_OQ));
                if ((enter | reach) == 0) continue;
            }
            _mm256_storeu_pd(av, a);
            _mm256_storeu_pd(sv, sl);
        }
        for (size_t r = 0; r < m; r++) {
            const size_t row = i + r;
            if (eligible != NULL && !eligible[row]) continue;
            const double lo = av[r] - sv[r], up = av[r] + sv[r];
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

/* Kernels for 1 .. A2V_SPECIALISED chunks (up to 768 columns), with the query in registers; wider
 * rows run the same code with the query in memory. */
#define A2V_SPECIALISED 12
#define A2V_EACH(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)
#define A2V_DOT2(C)                                                                                      \
    static A2V_TARGET void dot2_##C(const int8_t *codes, size_t n, const uint8_t *qu0, const uint8_t *qu1, \
                                    const int32_t *rowsum128, int32_t *out0, int32_t *out1) {             \
        dot2_body(codes, n, C, qu0, qu1, rowsum128, out0, out1);                                          \
    }
#define A2V_SCAN(C)                                                                                          \
    static A2V_TARGET int64_t scan_##C(const int8_t *codes, size_t n, const uint8_t *qu0, const uint8_t *qu1, \
                                       const int32_t *rowsum128, const double *residual, const double *f32,   \
                                       const double *code_norm, const uint8_t *eligible, size_t k,            \
                                       double *heap, int64_t *cand, double *upper, a2v_bound *b) {            \
        return scan_body(codes, n, C, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand,  \
                         upper, b);                                                                           \
    }
A2V_EACH(A2V_DOT2)
A2V_EACH(A2V_SCAN)

A2V_TARGET int a2v_int8_dot2(const int8_t *restrict codes, size_t n, size_t stride, const uint8_t *restrict qu0,
                             const uint8_t *restrict qu1, const int32_t *restrict rowsum128, int32_t *restrict out0,
                             int32_t *restrict out1) {
    if (stride % 64 != 0 || stride == 0 || stride / 64 > A2V_MAX_CHUNKS) return -1;
    const size_t chunks = stride / 64;
    switch (chunks) {
#define A2V_CASE(C)                                          \
    case C:                                                  \
        dot2_##C(codes, n, qu0, qu1, rowsum128, out0, out1); \
        return 0;
        A2V_EACH(A2V_CASE)
#undef A2V_CASE
        default:
            dot2_body(codes, n, chunks, qu0, qu1, rowsum128, out0, out1);
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
 * weights w1, w2, ‖q‖ and ‖c ⊙ q − its rounding‖ into b. */
static void round_query(const float *restrict query, size_t d, const double *restrict scale, size_t stride,
                        int8_t *restrict qrows, uint8_t *restrict qu0, uint8_t *restrict qu1, a2v_bound *b) {
    double top = 0, nq = 0, l1 = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], a = v < 0 ? -v : v;
        top = a > top ? a : top;
        nq += (double)query[j] * (double)query[j];
        l1 += 0.5 * a; /* sum of c_j / 2 * |q_j|: each code is within c_j / 2 of its value */
    }
    const double b1 = unit(top);
    double top2 = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], rest = v - round127(v / b1) * b1, a = rest < 0 ? -rest : rest;
        top2 = a > top2 ? a : top2;
    }
    const double b2 = unit(top2);
    double left = 0;
    for (size_t j = 0; j < d; j++) {
        const double v = scale[j] * (double)query[j], r1 = round127(v / b1), rest = v - r1 * b1;
        const double r2 = round127(rest / b2), e = rest - r2 * b2;
        left += e * e;
        qrows[j] = (int8_t)r1;
        qrows[d + j] = (int8_t)r2;
        qu0[j] = (uint8_t)(r1 + 128);
        qu1[j] = (uint8_t)(r2 + 128);
    }
    for (size_t j = d; j < stride; j++) qu0[j] = qu1[j] = 128; /* the padding's codes are 0 */
    b->w1 = b1;
    b->w2 = b2;
    b->qn = __builtin_sqrt(nq);
    b->left = __builtin_sqrt(left);
    b->l1 = l1;
}

/* The scan's candidates in one pass over the codes. The query (float32, d values) is rounded as
 * `round_query` says (its int8 rows into qrows, 2 x d; w1, w2, qn, left, l1 into bound[0..4]). Row
 * i's approximate score is a_i = w1 * p1_i + w2 * p2_i (the exact products with the two rows) and its
 * bound s_i = min(residual[i] * qn, l1) + (f32[i] * qn + code_norm[i] * left), where l1 = the sum of
 * c_j / 2 * |q_j| bounds the codes' error as residual[i] * qn (Cauchy-Schwarz) does, and is ~6x
 * tighter on the served vectors; tau (bound[5]) is the k-th best a_i - s_i over
 * the eligible rows (eligible NULL: all), and the candidates are the eligible rows with
 * a_i + s_i >= tau, written ascending to cand (room for n; `upper` and `heap`, n and k doubles, are
 * scratch). tau only grows during the pass, so the rows kept against the running tau are a superset,
 * cut at the final tau at the end. Returns the number of candidates; -1 for a stride or width it
 * cannot run, -2 for k = 0 or fewer eligible rows than k. */
A2V_TARGET int64_t a2v_int8_scan(const int8_t *restrict codes, size_t n, size_t stride,
                                 const int32_t *restrict rowsum128, const float *restrict query, size_t d,
                                 const double *restrict scale, const double *restrict residual,
                                 const double *restrict f32, const double *restrict code_norm,
                                 const uint8_t *restrict eligible, size_t k,
                                 double *restrict heap, int64_t *restrict cand, double *restrict upper,
                                 int8_t *restrict qrows, double *restrict bound) {
    if (stride % 64 != 0 || stride == 0 || stride / 64 > A2V_MAX_CHUNKS || d > stride || d + 64 <= stride)
        return -1;
    if (k == 0) return -2;
    uint8_t qu0[64 * A2V_MAX_CHUNKS] __attribute__((aligned(64)));
    uint8_t qu1[64 * A2V_MAX_CHUNKS] __attribute__((aligned(64)));
    a2v_bound b;
    round_query(query, d, scale, stride, qrows, qu0, qu1, &b);
    const size_t chunks = stride / 64;
    int64_t kept;
    switch (chunks) {
#define A2V_CASE(C)                                                                                           \
    case C:                                                                                                   \
        kept = scan_##C(codes, n, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand, upper, \
                        &b);                                                                                  \
        break;
        A2V_EACH(A2V_CASE)
#undef A2V_CASE
        default:
            kept = scan_body(codes, n, chunks, qu0, qu1, rowsum128, residual, f32, code_norm, eligible, k, heap, cand,
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
    return m;
}

/* Each listed row's dot product with q in float64, summed in one fixed order (eight running sums over
 * the columns, added pairwise), so a row's score depends on that row alone, never on which other rows
 * are scored with it. Plain C: any x86-64 CPU; -ffp-contract=off keeps the order. */
void a2v_rows_dot(const float *restrict vectors, size_t d, const int64_t *restrict rows, size_t m,
                  const double *restrict q, double *restrict out) {
    for (size_t r = 0; r < m; r++) {
        const float *x = vectors + (size_t)rows[r] * d;
        if (r + 2 < m) { /* the rows are scattered: fetch two ahead (1.6x faster from memory, measured) */
            const char *ahead = (const char *)(vectors + (size_t)rows[r + 2] * d);
            for (size_t c = 0; c < d * sizeof(float); c += 64) __builtin_prefetch(ahead + c);
        }
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        size_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (size_t l = 0; l < 8; l++) s[l] += (double)x[j + l] * q[j + l];
        for (size_t l = 0; j < d; j++, l++) s[l] += (double)x[j] * q[j];
        out[r] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
}

/* Exact int8 dot products of every stored row with two query rows, for the ranker's int8 scan
 * (services/ranker/memory_scan.py). torch's _int_mm is a general matrix product: for two query rows
 * it spends ~2.5x the time of one read of the codes. This kernel streams each row once and keeps
 * the query in registers, with AVX-512 VNNI (vpdpbusd: 64 unsigned-by-signed byte products summed
 * into 16 int32 lanes per instruction).
 *
 * Layout (anime2vec/native/int8dot.py): rows padded with zeros to a stride that is a multiple of 64
 * bytes; the query shifted to unsigned (q + 128, padding 128) because vpdpbusd multiplies unsigned
 * by signed, and 128 * (row sum) subtracted again. Every sum is exact in int32: |codes| <= 127,
 * q + 128 <= 255 and at most 4096 columns give |sum| < 2^31.
 *
 * Loaded with ctypes, not imported: the library has no Python entry point. */
#include <stddef.h>
#include <stdint.h>
#include <immintrin.h>

#define A2V_MAX_CHUNKS 64 /* 64 x 64 bytes: up to 4096 columns */

int a2v_int8_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

int a2v_int8_max_stride(void) { return 64 * A2V_MAX_CHUNKS; }

/* One row at a time, in order: a plain forward stream the hardware prefetcher follows (four rows
 * interleaved measured 2x slower with a cold cache). Two accumulators per query row (even and odd
 * chunks) keep two products in flight. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) int a2v_int8_dot2(
    const int8_t *restrict codes, size_t n, size_t stride, const uint8_t *restrict qu0,
    const uint8_t *restrict qu1, const int32_t *restrict rowsum128, int32_t *restrict out0,
    int32_t *restrict out1) {
    if (stride % 64 != 0 || stride / 64 > A2V_MAX_CHUNKS) return -1;
    const size_t chunks = stride / 64;
    __m512i q0[A2V_MAX_CHUNKS], q1[A2V_MAX_CHUNKS];
    for (size_t c = 0; c < chunks; c++) {
        q0[c] = _mm512_loadu_si512(qu0 + 64 * c);
        q1[c] = _mm512_loadu_si512(qu1 + 64 * c);
    }
    for (size_t i = 0; i < n; i++) {
        const int8_t *row = codes + i * stride;
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
        out0[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, b0)) - rowsum128[i];
        out1[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(a1, b1)) - rowsum128[i];
    }
    return 0;
}

/* In-place PReLU over a channels-last map, with an optional per-pixel map added first (broadcast over the batch).
 *
 *     y[n, p, c] = v > 0 ? v : weight[c] * v,   v = y[n, p, c] + add[p, c]   (add optional)
 *
 * y is (N, P, C) in memory: an NCHW tensor in channels-last layout with P = H * W. bf16 values are widened to
 * float, computed in float and rounded back to nearest-even, as PyTorch computes bf16 PReLU. Built by
 * aucvt_zoo/native.py with the system C compiler (-O3 -march=native: AVX512-BF16 intrinsics where the CPU has
 * them, auto-vectorised loops elsewhere) and called through ctypes. No PyTorch headers: the library only sees
 * pointers and sizes, checked on the Python side.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define AUCVT_AVX512_BF16 1
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;  /* NaN stays a quiet NaN */
}

#ifdef AUCVT_AVX512_BF16
/* 16 channels at a time: widen bf16 by a shift, round back with the AVX512-BF16 nearest-even conversion */
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* Single-threaded on purpose: PyTorch's OpenMP workers spin between operations, and a thread of our own would
 * fight them for the cores (measured: batch 1 slowed down by 10-20%). One core still runs the pass 2x faster than
 * PyTorch's bf16 PReLU on two (8 x 64 x 112 x 112: 0.59 vs 1.16 ms). */
void aucvt_prelu_bf16(uint16_t *y, const float *restrict w, const uint16_t *add, int64_t n, int64_t p, int64_t c) {
    for (int64_t r = 0; r < n * p; ++r) {
        uint16_t *restrict row = y + r * c;
        const uint16_t *restrict a = add ? add + (r % p) * c : NULL;
        int64_t j = 0;
#ifdef AUCVT_AVX512_BF16
        const __m512 zero = _mm512_setzero_ps();
        for (; j + 16 <= c; j += 16) {
            __m512 v = load_bf16x16(row + j);
            if (a) v = _mm512_add_ps(v, load_bf16x16(a + j));
            __mmask16 positive = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
            __m512 out = _mm512_mask_blend_ps(positive, _mm512_mul_ps(v, _mm512_loadu_ps(w + j)), v);
            __m256bh rounded = _mm512_cvtneps_pbh(out);
            _mm256_storeu_si256((__m256i *)(row + j), (__m256i)rounded);
        }
#endif
        if (a) {
            for (; j < c; ++j) {
                float v = bf16_to_float(row[j]) + bf16_to_float(a[j]);
                row[j] = float_to_bf16(v > 0.0f ? v : w[j] * v);
            }
        } else {
            for (; j < c; ++j) {
                float v = bf16_to_float(row[j]);
                row[j] = float_to_bf16(v > 0.0f ? v : w[j] * v);
            }
        }
    }
}

void aucvt_prelu_f32(float *y, const float *restrict w, const float *add, int64_t n, int64_t p, int64_t c) {
    for (int64_t r = 0; r < n * p; ++r) {
        float *restrict row = y + r * c;
        if (add) {
            const float *restrict a = add + (r % p) * c;
            for (int64_t j = 0; j < c; ++j) {
                float v = row[j] + a[j];
                row[j] = v > 0.0f ? v : w[j] * v;
            }
        } else {
            for (int64_t j = 0; j < c; ++j) {
                float v = row[j];
                row[j] = v > 0.0f ? v : w[j] * v;
            }
        }
    }
}

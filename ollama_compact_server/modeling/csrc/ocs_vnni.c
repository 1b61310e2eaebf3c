/* The blocked int8 and int4 products (ocs_cpu.c's ocs_b8_mm / ocs_b4_mm) for CPUs with
 * AVX512-VNNI (Intel since Cascade Lake and Ice Lake, AMD since Zen 4), chosen at run time.
 *
 * VNNI's vpdpbusd adds four unsigned-by-signed byte products into each 32-bit lane in one
 * instruction, exactly (no 16-bit saturation on the way), where AVX2 needs four (sign,
 * vpmaddubsw, vpmaddwd, add) for the same products. The weights, signed int8 in the
 * runtime layout, are made unsigned on the fly (w ^ 0x80 = w + 128) and the activation
 * codes stay signed, so each block's sum comes out as sum (w + 128) q_x; the exact sum is
 * that minus 128 * sum q_x, a term of the activation row alone, computed once per block.
 * int4 codes (0..15) are unsigned already.
 *
 * Every block's integer sum is the same integer the AVX2 kernels compute, and the float
 * steps after it are the same operations in the same order, so each output is bit for bit
 * the AVX2 kernel's: a result depends neither on the batch nor on which kernel ran
 * (tests/test_cpu_kernels.py compares the two). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "ocs.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

#define QB 32      /* activation block: columns per scale */
#define PF 4096    /* bytes of weights to prefetch ahead for one-row products */

/* ------------------------------------------------------------------------------ int8 */

/* MB activation rows against the block's 64 weight rows (4 x 16), over all of K: per block
 * of 32 columns, the exact integer sum, then total += (float)sum * d_block, in block
 * order. */
static inline __attribute__((always_inline)) void b8v_tile(
    const int8_t* blk, const int8_t* xq, const int32_t* xc, const float* d, int64_t Kp, int MB,
    int prefetch, __m512 tot[4][4]) {
  enum { NW = 4 };
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int64_t nb = Kp / QB;
  for (int m = 0; m < MB; m++)
    for (int i = 0; i < NW; i++) tot[m][i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nb; kb++) {
    __m512i acc[4][4];
    for (int m = 0; m < MB; m++)
      for (int i = 0; i < NW; i++) acc[m][i] = _mm512_setzero_si512();
    for (int g = 0; g < QB / 4; g++) {
      const int64_t k = kb * QB + g * 4;
      const int8_t* wp = blk + k * 64;
      if (prefetch) {
        _mm_prefetch((const char*)(wp + PF), _MM_HINT_T0);
        _mm_prefetch((const char*)(wp + PF + 64), _MM_HINT_T0);
        _mm_prefetch((const char*)(wp + PF + 128), _MM_HINT_T0);
        _mm_prefetch((const char*)(wp + PF + 192), _MM_HINT_T0);
      }
      __m512i w[4];
      for (int i = 0; i < NW; i++)
        w[i] = _mm512_xor_si512(_mm512_loadu_si512((const void*)(wp + i * 64)), flip);
      for (int m = 0; m < MB; m++) {
        const __m512i xb = _mm512_set1_epi32(*(const int32_t*)(xq + m * Kp + k));
        for (int i = 0; i < NW; i++) acc[m][i] = _mm512_dpbusd_epi32(acc[m][i], w[i], xb);
      }
    }
    for (int m = 0; m < MB; m++) {
      const __m512i c = _mm512_set1_epi32(xc[m * nb + kb]);
      const __m512 dv = _mm512_set1_ps(d[m * nb + kb]);
      for (int i = 0; i < NW; i++)
        tot[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][i], c)), dv,
                                    tot[m][i]);
    }
  }
}

/* out[m, first + 16 i + lane] = tot[m][i] (times scale[first + ...] unless scale is NULL),
 * for the columns below `valid` */
static inline __attribute__((always_inline)) void store_tiles(
    __m512 tot[4][4], int MB, int NW, int64_t first, const float* scale, int64_t valid,
    float* out, int64_t ldo) {
  for (int i = 0; i < NW; i++) {
    const int64_t c0 = first + i * 16;
    if (c0 >= valid) break;
    const __mmask16 mask = valid - c0 >= 16 ? (__mmask16)0xFFFF
                                            : (__mmask16)((1u << (valid - c0)) - 1);
    for (int m = 0; m < MB; m++) {
      const __m512 v = scale ? _mm512_mul_ps(tot[m][i], _mm512_loadu_ps(scale + c0)) : tot[m][i];
      _mm512_mask_storeu_ps(out + m * ldo + c0, mask, v);
    }
  }
}

#define B8V_ROWS 3 /* activation rows a pass keeps in registers: 3 x 4 x 2 + 4 + 1 = 29 */

void ocs_b8_block_vnni(const int8_t* blk, const int8_t* xq, const int32_t* xc, const float* d,
                       int64_t M, int64_t Kp, const float* scale, int64_t n0, int64_t valid,
                       float* out, int64_t ldo) {
  const int64_t nb = Kp / QB;
  __m512 tot[4][4];
  const float* sc = scale + n0;
  float* o = out + n0;
  if (M == 1) { /* the weight stream of one sequence: read once, prefetched ahead */
    b8v_tile(blk, xq, xc, d, Kp, 1, 1, tot);
    store_tiles(tot, 1, 4, 0, sc, valid, o, ldo);
    return;
  }
  int64_t m = 0;
  for (; m + B8V_ROWS <= M; m += B8V_ROWS) {
    b8v_tile(blk, xq + m * Kp, xc + m * nb, d + m * nb, Kp, B8V_ROWS, 0, tot);
    store_tiles(tot, B8V_ROWS, 4, 0, sc, valid, o + m * ldo, ldo);
  }
  switch (M - m) {
    case 2:
      b8v_tile(blk, xq + m * Kp, xc + m * nb, d + m * nb, Kp, 2, 0, tot);
      store_tiles(tot, 2, 4, 0, sc, valid, o + m * ldo, ldo);
      break;
    case 1:
      b8v_tile(blk, xq + m * Kp, xc + m * nb, d + m * nb, Kp, 1, 0, tot);
      store_tiles(tot, 1, 4, 0, sc, valid, o + m * ldo, ldo);
      break;
    default:
      break;
  }
}

/* ------------------------------------------------------------------------------ int4 */

/* MB activation rows against NW x 16 rows of an int4 block (starting at row `row0`), over
 * all of K. Per group: acc = sum over its blocks, in order, of (float)sum * d_block; then
 * total += scale * (acc - 8 sum_x) + zero * sum_x, as ocs_cpu.c's b4_tile. */
static inline __attribute__((always_inline)) void b4v_tile(
    const uint8_t* blk, int64_t row0, int NW, const int8_t* xq, const float* d,
    const float* xsum, int64_t K, int64_t G, const uint32_t* sz, int64_t npad, int64_t n0,
    int MB, int prefetch, __m512 tot[4][4]) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000);
  const int64_t groups = K / G, nblk = K / QB;
  for (int m = 0; m < MB; m++)
    for (int i = 0; i < NW; i++) tot[m][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m512 acc[4][4];
    for (int m = 0; m < MB; m++)
      for (int i = 0; i < NW; i++) acc[m][i] = _mm512_setzero_ps();
    for (int64_t kb = g * (G / QB); kb < (g + 1) * (G / QB); kb++) {
      __m512i sum[4][4];
      for (int m = 0; m < MB; m++)
        for (int i = 0; i < NW; i++) sum[m][i] = _mm512_setzero_si512();
      for (int c = 0; c < QB / 8; c++) {
        const int64_t k = kb * QB + c * 8;
        const uint8_t* wp = blk + k * 32 + row0 * 4;
        if (prefetch) {
          _mm_prefetch((const char*)(wp + PF), _MM_HINT_T0);
          _mm_prefetch((const char*)(wp + PF + 64), _MM_HINT_T0);
          _mm_prefetch((const char*)(wp + PF + 128), _MM_HINT_T0);
          _mm_prefetch((const char*)(wp + PF + 192), _MM_HINT_T0);
        }
        __m512i lo[4], hi[4];
        for (int i = 0; i < NW; i++) {
          const __m512i v = _mm512_loadu_si512((const void*)(wp + i * 64));
          lo[i] = _mm512_and_si512(v, mask);
          hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        }
        for (int m = 0; m < MB; m++) {
          const __m512i lx = _mm512_set1_epi32(*(const int32_t*)(xq + m * K + k));
          const __m512i hx = _mm512_set1_epi32(*(const int32_t*)(xq + m * K + k + 4));
          for (int i = 0; i < NW; i++) {
            sum[m][i] = _mm512_dpbusd_epi32(sum[m][i], lo[i], lx);
            sum[m][i] = _mm512_dpbusd_epi32(sum[m][i], hi[i], hx);
          }
        }
      }
      for (int m = 0; m < MB; m++) {
        const __m512 dv = _mm512_set1_ps(d[m * nblk + kb]);
        for (int i = 0; i < NW; i++)
          acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][i]), dv, acc[m][i]);
      }
    }
    const uint32_t* words = sz + g * npad + n0 + row0;
    for (int i = 0; i < NW; i++) {
      const __m512i v = _mm512_loadu_si512((const void*)(words + i * 16));
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      for (int m = 0; m < MB; m++) {
        const float s = xsum[m * groups + g];
        tot[m][i] = _mm512_fmadd_ps(sc, _mm512_sub_ps(acc[m][i], _mm512_set1_ps(8.0f * s)),
                                    tot[m][i]);
        tot[m][i] = _mm512_fmadd_ps(ze, _mm512_set1_ps(s), tot[m][i]);
      }
    }
  }
}

#define B4V_ROWS 3 /* 3 x 2 x 3 + 2 x 2 + 2 = 24 registers */

void ocs_b4_block_vnni(const uint8_t* blk, const int8_t* xq, const float* d, const float* xsum,
                       int64_t M, int64_t K, int64_t G, const uint32_t* sz, int64_t npad,
                       int64_t n0, int64_t valid, float* out, int64_t ldo) {
  const int64_t groups = K / G, nblk = K / QB;
  __m512 tot[4][4];
  float* o = out + n0;
  if (M == 1) {
    b4v_tile(blk, 0, 4, xq, d, xsum, K, G, sz, npad, n0, 1, 1, tot);
    store_tiles(tot, 1, 4, 0, NULL, valid, o, ldo);
    return;
  }
  for (int64_t half = 0; half < 2; half++) {
    const int64_t row0 = half * 32;
    if (row0 >= valid) break;
    int64_t m = 0;
    for (; m + B4V_ROWS <= M; m += B4V_ROWS) {
      b4v_tile(blk, row0, 2, xq + m * K, d + m * nblk, xsum + m * groups, K, G, sz, npad, n0,
               B4V_ROWS, 0, tot);
      store_tiles(tot, B4V_ROWS, 2, row0, NULL, valid, o + m * ldo, ldo);
    }
    switch (M - m) {
      case 2:
        b4v_tile(blk, row0, 2, xq + m * K, d + m * nblk, xsum + m * groups, K, G, sz, npad, n0,
                 2, 0, tot);
        store_tiles(tot, 2, 2, row0, NULL, valid, o + m * ldo, ldo);
        break;
      case 1:
        b4v_tile(blk, row0, 2, xq + m * K, d + m * nblk, xsum + m * groups, K, G, sz, npad, n0,
                 1, 0, tot);
        store_tiles(tot, 1, 2, row0, NULL, valid, o + m * ldo, ldo);
        break;
      default:
        break;
    }
  }
}

#pragma GCC pop_options

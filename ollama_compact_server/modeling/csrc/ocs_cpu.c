/* Weight-only int8 / int4 matrix products for x86-64 CPUs with AVX2 and FMA.
 *
 * out[m, n] = sum_k x[m, k] * w[n, k], with x float32 and w stored as
 *   - int8: q[n, k] int8, row-major, one float scale per output row: w = q * scale[n];
 *   - int4: torch's CPU int4 packing (blocks of 64 rows; byte k * 32 + j of a block holds
 *     row j in its low nibble and row j + 32 in its high nibble), asymmetric groups of G
 *     input columns with (scale, zero) per group and row: w = (q - 8) * scale + zero.
 *
 * Every output element is computed by the same instructions in the same order whatever the
 * number of rows M, the tiling or the thread that computes it: a request's result does not
 * depend on the batch it is in (the engine's greedy outputs are equal alone and batched).
 * Threads come from OpenMP; loaded into a process that runs torch, this library shares
 * torch's libgomp (same soname), so it uses the calling thread's pool, not a second one.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ocs.h"

int OCS_API ocs_abi_version(void) { return 6; }

/* Which kernels the blocked products use: 1 AVX512-VNNI (ocs_vnni.c) where the CPU has it,
 * 0 AVX2. Chosen on first use; ocs_set_isa(0) keeps to AVX2 (tests compare the two). */
static int isa = -1;

static int cpu_has_vnni(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

/* level 0: AVX2 only; 1: the best the CPU has. Returns the level now in force. */
int OCS_API ocs_set_isa(int level) {
  isa = level > 0 && cpu_has_vnni() ? 1 : 0;
  return isa;
}

int OCS_API ocs_isa(void) {
  if (isa < 0) ocs_set_isa(1);
  return isa;
}

/* Bytes ahead of the weight stream to prefetch: the hardware prefetcher alone left the
 * one-row products at 75-80% of the memory bandwidth on a 2-core EPYC (a head of 168 MB
 * took 15-16 ms against 13 ms with this, in one run). */
#define PREFETCH 4096

static inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* ------------------------------------------------------------------------------ int8 */

/* One output element: four accumulators, accumulator j over the 8 columns at 32 i + 8 j
 * (increasing i), then columns past the last multiple of 32 into accumulator 0 in steps of
 * 8, the lane sum ((a0 + a1) + (a2 + a3)), the scalar tail, times the row's scale. The
 * tiles below compute exactly this, accumulator by accumulator. */
static inline float w8_dot(const float* x, const int8_t* r, int64_t K, float scale) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char*)(r + k + PREFETCH), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8_i8(r + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8_i8(r + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8_i8(r + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8_i8(r + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8_i8(r + k), a0);
  float s = ocs_hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; k++) s += x[k] * (float)r[k];
  return s * scale;
}

/* MB rows of x against NB weight rows: the same sums as w8_dot, one accumulator pass at a
 * time, so each weight chunk is converted once for MB rows. */
static inline __attribute__((always_inline)) void w8_tile(
    const float* x, int64_t ldx, int MB, const int8_t* q, int64_t K, int NB,
    const float* scale, float* out, int64_t ldo) {
  __m256 part[4][2][4];
  const int64_t K32 = K & ~(int64_t)31;
  for (int j = 0; j < 4; j++) {
    __m256 acc[4][2];
    for (int m = 0; m < MB; m++)
      for (int n = 0; n < NB; n++) acc[m][n] = _mm256_setzero_ps();
    for (int64_t k = 8 * j; k < K32; k += 32) {
      __m256 w[2];
      for (int n = 0; n < NB; n++) w[n] = load8_i8(q + n * K + k);
      for (int m = 0; m < MB; m++) {
        __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
        for (int n = 0; n < NB; n++) acc[m][n] = _mm256_fmadd_ps(xv, w[n], acc[m][n]);
      }
    }
    if (j == 0) {
      for (int64_t k = K32; k + 8 <= K; k += 8) {
        __m256 w[2];
        for (int n = 0; n < NB; n++) w[n] = load8_i8(q + n * K + k);
        for (int m = 0; m < MB; m++) {
          __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
          for (int n = 0; n < NB; n++) acc[m][n] = _mm256_fmadd_ps(xv, w[n], acc[m][n]);
        }
      }
    }
    for (int m = 0; m < MB; m++)
      for (int n = 0; n < NB; n++) part[m][n][j] = acc[m][n];
  }
  const int64_t K8 = K & ~(int64_t)7;
  for (int m = 0; m < MB; m++) {
    for (int n = 0; n < NB; n++) {
      __m256* p = part[m][n];
      float s = ocs_hsum(_mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])));
      for (int64_t k = K8; k < K; k++) s += x[m * ldx + k] * (float)q[n * K + k];
      out[m * ldo + n] = s * scale[n];
    }
  }
}

static void w8_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* q,
                    const float* scale, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; n++) out[n] = w8_dot(x, q + n * K, K, scale[n]);
    return;
  }
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      w8_tile(x + m * ldx, ldx, 4, q + n * K, K, 2, scale + n, out + m * ldo + n, ldo);
    const float* xm = x + m * ldx;
    float* om = out + m * ldo + n;
    switch (M - m) {
      case 3: w8_tile(xm, ldx, 3, q + n * K, K, 2, scale + n, om, ldo); break;
      case 2: w8_tile(xm, ldx, 2, q + n * K, K, 2, scale + n, om, ldo); break;
      case 1: w8_tile(xm, ldx, 1, q + n * K, K, 2, scale + n, om, ldo); break;
      default: break;
    }
  }
  for (; n < n1; n++) {
    for (int64_t m = 0; m < M; m++) out[m * ldo + n] = w8_dot(x + m * ldx, q + n * K, K, scale[n]);
  }
}

/* x [M, K] (row stride ldx) times int8 q [N, K]^T scaled per row -> out [M, N] (stride ldo) */
void OCS_API ocs_w8_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* q,
                       const float* scale, int64_t N, float* out, int64_t ldo, int threads) {
  const int64_t chunk = 64;
  const int64_t chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks; c++) {
    int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
    w8_rows(x, M, K, ldx, q, scale, n0, n1, out, ldo);
  }
}

/* ------------------------------------------------------------------------------ int8, blocked */

/* The runtime layout of int8 weights on CPU: blocks of 64 output rows; within a block, for
 * each group of 4 input columns, the 64 rows' 4 weights side by side (byte
 * (k / 4) * 256 + j * 4 + k % 4 of block b is row b * 64 + j, column k), columns padded
 * with zeros to a multiple of 32; scales float32 per row.
 *
 * The activations are quantized too, as llama.cpp does for its integer dot products: each
 * row of x in blocks of 32 columns to int8 with one float scale per block (d = max|x| / 127,
 * q = round-half-even(x * 127 / max|x|)). Then every output is
 *     scale[n] * sum over blocks, in order, of d_b * (exact int32 sum of q_x * q_w),
 * the block terms accumulated with one fma each: the same instructions in the same order
 * whatever the rows, the tiling or the thread, so batching never changes a result. The
 * integer products (vpmaddubsw on |q_x| and q_w carrying q_x's sign) do 32 multiplies an
 * instruction where float FMAs do 8: about 1.4x the float kernel at 16-64 rows. */
#define B8_ROWS 64
#define QBLOCK 32

static inline int64_t kpad32(int64_t K) { return (K + QBLOCK - 1) / QBLOCK * QBLOCK; }

/* x [M, K] (stride ldx) -> xq, xa = |xq| (unless NULL) int8 [M, Kp] (zero padded),
 * d [M, Kp / 32] */
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp,
                          int8_t* xq, int8_t* xa, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * ldx;
    for (int64_t k0 = 0; k0 < Kp; k0 += QBLOCK) {
      float tmp[QBLOCK] __attribute__((aligned(32)));
      const float* src = xr + k0;
      if (k0 + QBLOCK > K) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, xr + k0, (size_t)(K - k0) * sizeof(float));
        src = tmp;
      }
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(src + i * 8);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float top = _mm_cvtss_f32(h);
      const float inv = top > 0.0f ? 127.0f / top : 0.0f;
      d[m * (Kp / QBLOCK) + k0 / QBLOCK] = top / 127.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int i = 0; i < 4; i++) /* the default rounding mode: to nearest, ties to even */
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
      _mm256_storeu_si256((__m256i*)(xq + m * Kp + k0), bytes);
      if (xa != NULL) _mm256_storeu_si256((__m256i*)(xa + m * Kp + k0), _mm256_abs_epi8(bytes));
    }
  }
}

/* rows m0 .. m0 + MB (MB <= 2) of the quantized x against 32 rows (half h) of a block:
 * totals[m][32 h .. 32 h + 32] += per-block terms, block by block */
static inline __attribute__((always_inline)) void b8_tile(const int8_t* blk, int h,
                                                          const int8_t* xq, const int8_t* xa,
                                                          const float* d, int64_t Kp, int MB,
                                                          float* totals) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t kb = 0; kb < Kp / QBLOCK; kb++) {
    __m256i acc[2][4];
    for (int m = 0; m < MB; m++)
      for (int i = 0; i < 4; i++) acc[m][i] = _mm256_setzero_si256();
    for (int g = 0; g < QBLOCK / 4; g++) {
      const int64_t k = kb * QBLOCK + g * 4;
      const int8_t* wp = blk + k * B8_ROWS + h * 128;
      for (int m = 0; m < MB; m++) {
        const __m256i xb = _mm256_set1_epi32(*(const int32_t*)(xq + m * Kp + k));
        const __m256i ab = _mm256_set1_epi32(*(const int32_t*)(xa + m * Kp + k));
        for (int i = 0; i < 4; i++) {
          const __m256i w = _mm256_load_si256((const __m256i*)(wp + i * 32));
          const __m256i pairs = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(w, xb));
          acc[m][i] = _mm256_add_epi32(acc[m][i], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int m = 0; m < MB; m++) {
      const __m256 dv = _mm256_set1_ps(d[m * (Kp / QBLOCK) + kb]);
      for (int i = 0; i < 4; i++) {
        float* t = totals + m * 64 + h * 32 + i * 8;
        _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][i]), dv, _mm256_loadu_ps(t)));
      }
    }
  }
}

/* one row against a whole block in one pass over it (the weight stream of a decode step
 * of one sequence: memory-bound, so each byte is read once, prefetched ahead); the same
 * sums as b8_tile */
static void b8_row(const int8_t* blk, const int8_t* xq, const int8_t* xa, const float* d,
                   int64_t Kp, float* totals) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[8];
  for (int i = 0; i < 8; i++) f[i] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < Kp / QBLOCK; kb++) {
    __m256i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
    for (int g = 0; g < QBLOCK / 4; g++) {
      const int64_t k = kb * QBLOCK + g * 4;
      const int8_t* wp = blk + k * B8_ROWS;
      _mm_prefetch((const char*)(wp + PREFETCH), _MM_HINT_T0);
      _mm_prefetch((const char*)(wp + PREFETCH + 64), _MM_HINT_T0);
      _mm_prefetch((const char*)(wp + PREFETCH + 128), _MM_HINT_T0);
      _mm_prefetch((const char*)(wp + PREFETCH + 192), _MM_HINT_T0);
      const __m256i xb = _mm256_set1_epi32(*(const int32_t*)(xq + k));
      const __m256i ab = _mm256_set1_epi32(*(const int32_t*)(xa + k));
      for (int i = 0; i < 8; i++) {
        const __m256i w = _mm256_load_si256((const __m256i*)(wp + i * 32));
        const __m256i pairs = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(w, xb));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
      }
    }
    const __m256 dv = _mm256_set1_ps(d[kb]);
    for (int i = 0; i < 8; i++) f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), dv, f[i]);
  }
  for (int i = 0; i < 8; i++) _mm256_storeu_ps(totals + i * 8, f[i]);
}

#define B8_TILE_ROWS 32 /* rows whose running sums a block keeps at once */

static void b8_block(const int8_t* blk, const int8_t* xq, const int8_t* xa, const float* d,
                     int64_t M, int64_t Kp, const float* scale, int64_t n0, int64_t valid,
                     float* out, int64_t ldo) {
  float totals[B8_TILE_ROWS * 64] __attribute__((aligned(32)));
  for (int64_t r0 = 0; r0 < M; r0 += B8_TILE_ROWS) {
    const int64_t rows = M - r0 < B8_TILE_ROWS ? M - r0 : B8_TILE_ROWS;
    memset(totals, 0, sizeof(float) * (size_t)rows * 64);
    const int8_t* q = xq + r0 * Kp;
    const int8_t* a = xa + r0 * Kp;
    const float* dr = d + r0 * (Kp / QBLOCK);
    for (int h = 0; h < 2 && rows > 1; h++) {
      int64_t m = 0;
      for (; m + 2 <= rows; m += 2)
        b8_tile(blk, h, q + m * Kp, a + m * Kp, dr + m * (Kp / QBLOCK), Kp, 2, totals + m * 64);
      if (m < rows)
        b8_tile(blk, h, q + m * Kp, a + m * Kp, dr + m * (Kp / QBLOCK), Kp, 1, totals + m * 64);
    }
    if (rows == 1) b8_row(blk, q, a, dr, Kp, totals);
    for (int64_t m = 0; m < rows; m++) {
      float tmp[64];
      for (int i = 0; i < 8; i++)
        _mm256_storeu_ps(tmp + i * 8, _mm256_mul_ps(_mm256_loadu_ps(totals + m * 64 + i * 8),
                                                    _mm256_loadu_ps(scale + n0 + i * 8)));
      memcpy(out + (r0 + m) * ldo + n0, tmp, (size_t)valid * sizeof(float));
    }
  }
}

/* x [M, K] times the blocked int8 weight -> out [M, N]; scale: float32 [Npad]. Returns -1
 * when there is no memory for the quantized activations. */
int OCS_API ocs_b8_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* qb,
                      const float* scale, int64_t N, float* out, int64_t ldo, int threads) {
  const int64_t Kp = kpad32(K);
  const size_t bytes = (size_t)(M * Kp) * 2 + (size_t)(M * (Kp / QBLOCK)) * sizeof(float);
  int8_t* xq = (int8_t*)aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (xq == NULL) return -1;
  int8_t* xa = xq + M * Kp;
  float* d = (float*)(xa + M * Kp);
  const int64_t blocks = (N + B8_ROWS - 1) / B8_ROWS;
  const int vnni = ocs_isa() == 1;
  /* the VNNI kernel reads no |x|: its place holds 128 * each block's sum of codes */
  int32_t* xc = (int32_t*)xa;
  quantize_rows(x, M, K, ldx, Kp, xq, vnni ? NULL : xa, d);
  for (int64_t i = 0; vnni && i < M * (Kp / QBLOCK); i++) {
    int32_t s = 0;
    for (int j = 0; j < QBLOCK; j++) s += xq[i * QBLOCK + j];
    xc[i] = 128 * s;
  }
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t n0 = b * B8_ROWS;
    const int64_t valid = N - n0 < B8_ROWS ? N - n0 : B8_ROWS;
    if (vnni)
      ocs_b8_block_vnni(qb + b * B8_ROWS * Kp, xq, xc, d, M, Kp, scale, n0, valid, out, ldo);
    else
      b8_block(qb + b * B8_ROWS * Kp, xq, xa, d, M, Kp, scale, n0, valid, out, ldo);
  }
  free(xq);
  return 0;
}

/* ------------------------------------------------------------------------------ float32 */

/* One output of a float32 weight row, summed as w8_dot sums (four accumulators over 32
 * columns at a time), so it too is the same whatever the batch. */
static inline float f32_dot(const float* x, const float* r, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char*)(r + k + PREFETCH / 4), _MM_HINT_T0);
    _mm_prefetch((const char*)(r + k + PREFETCH / 4 + 16), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(r + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(r + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(r + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(r + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(r + k), a0);
  float s = ocs_hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; k++) s += x[k] * r[k];
  return s;
}

/* x [M, K] times float32 w [N, K]^T -> out [M, N]: for decode-sized M (the weight is read
 * once per row; large M belongs to a BLAS). */
void OCS_API ocs_f32_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w,
                        int64_t N, float* out, int64_t ldo, int threads) {
  const int64_t chunk = 64;
  const int64_t chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks; c++) {
    int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
    for (int64_t n = n0; n < n1; n++)
      for (int64_t m = 0; m < M; m++) out[m * ldo + n] = f32_dot(x + m * ldx, w + n * K, K);
  }
}

/* ------------------------------------------------------------------------------ int4 */

/* The 64 codes of one packed column (32 bytes) as floats: rows 0..31 from the low nibbles,
 * rows 32..63 from the high ones. */
static inline void unpack64(const uint8_t* p, __m256 c[8]) {
  __m256i bytes = _mm256_loadu_si256((const __m256i*)p);
  __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_and_si256(bytes, mask);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  __m128i l0 = _mm256_castsi256_si128(lo), l1 = _mm256_extracti128_si256(lo, 1);
  __m128i h0 = _mm256_castsi256_si128(hi), h1 = _mm256_extracti128_si256(hi, 1);
  c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l0));
  c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l0, 8)));
  c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l1));
  c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l1, 8)));
  c[4] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h0));
  c[5] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h0, 8)));
  c[6] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h1));
  c[7] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h1, 8)));
}

/* Adds one group's contribution to the 64 totals of a block: acc holds sum_k q x over the
 * group, s the group's sum of x; (scale, zero) come as one 32-bit word per row (bf16 scale
 * in the low half, bf16 zero in the high half: a bf16 is the top half of a float32).
 * sum_k w x = scale * (sum q x - 8 sum x) + zero * sum x */
static inline void w4_finish_group(const __m256 acc[8], float s, const uint32_t* words,
                                   __m256 total[8]) {
  const __m256 shift = _mm256_set1_ps(8.0f * s), xs = _mm256_set1_ps(s);
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
  for (int i = 0; i < 8; i++) {
    __m256i v = _mm256_loadu_si256((const __m256i*)(words + i * 8));
    __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    __m256 ze = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    total[i] = _mm256_fmadd_ps(sc, _mm256_sub_ps(acc[i], shift), total[i]);
    total[i] = _mm256_fmadd_ps(ze, xs, total[i]);
  }
}

static inline void store64(float* o, const __m256 total[8], int64_t valid) {
  if (valid == 64) {
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + i * 8, total[i]);
  } else {
    float tmp[64];
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(tmp + i * 8, total[i]);
    memcpy(o, tmp, (size_t)valid * sizeof(float));
  }
}

#define W4_MAX_G 256

/* One block of 64 weight rows (rows n0 .. n0 + valid) against the M rows of x. For one row
 * the codes are unpacked as they are used; for more, each group's codes are unpacked once
 * into a scratch buffer that every row then reads. Either way each output is the same
 * sequence of operations: per group, acc_i += x_k * code over k in order, then the group's
 * scale and zero. xsum [M, K/G]: each row's sum of x per group. */
static void w4_block(const float* x, int64_t M, int64_t ldx, const float* xsum, int64_t K,
                     int64_t G, const uint8_t* blk, const uint32_t* sz, int64_t npad,
                     int64_t n0, int64_t valid, float* out, int64_t ldo) {
  const int64_t groups = K / G;
  if (M == 1) {
    __m256 total[8];
    for (int i = 0; i < 8; i++) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
      __m256 acc[8];
      for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
      const float* xr = x + g * G;
      const uint8_t* p = blk + g * G * 32;
      for (int64_t k = 0; k < G; k++) {
        __m256 c[8];
        _mm_prefetch((const char*)(p + k * 32 + PREFETCH), _MM_HINT_T0);
        unpack64(p + k * 32, c);
        __m256 xv = _mm256_broadcast_ss(xr + k);
        for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(xv, c[i], acc[i]);
      }
      w4_finish_group(acc, xsum[g], sz + g * npad + n0, total);
    }
    store64(out + n0, total, valid);
    return;
  }
  float codes[W4_MAX_G * 64] __attribute__((aligned(32)));
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t rows = M - m0 < 16 ? M - m0 : 16;
    __m256 totals[16][8];
    for (int64_t m = 0; m < rows; m++)
      for (int i = 0; i < 8; i++) totals[m][i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t* p = blk + g * G * 32;
      for (int64_t k = 0; k < G; k++) {
        __m256 c[8];
        unpack64(p + k * 32, c);
        for (int i = 0; i < 8; i++) _mm256_store_ps(codes + k * 64 + i * 8, c[i]);
      }
      for (int64_t m = 0; m < rows; m++) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        const float* xr = x + (m0 + m) * ldx + g * G;
        for (int64_t k = 0; k < G; k++) {
          __m256 xv = _mm256_broadcast_ss(xr + k);
          for (int i = 0; i < 8; i++)
            acc[i] = _mm256_fmadd_ps(xv, _mm256_load_ps(codes + k * 64 + i * 8), acc[i]);
        }
        w4_finish_group(acc, xsum[(m0 + m) * groups + g], sz + g * npad + n0, totals[m]);
      }
    }
    for (int64_t m = 0; m < rows; m++) store64(out + (m0 + m) * ldo + n0, totals[m], valid);
  }
}

/* ------------------------------------------------------------------------ int4, blocked */

/* The runtime layout of int4 weights on CPU when the group size is a multiple of 32:
 * blocks of 64 output rows; within a block, for each chunk of 8 input columns, each row's
 * 8 codes in 4 bytes side by side (byte (k / 8) * 256 + j * 4 + t of block b holds row
 * b * 64 + j, columns k + t in its low nibble and k + 4 + t in its high one). With x
 * quantized as for blocked int8 (ocs_b8_mm), the codes (0..15) go straight into
 * vpmaddubsw as its unsigned operand; eight products of one block of 32 columns stay
 * within 16 bits (8 * 2 * 15 * 127 < 32768). Every output is, per group, in order:
 *   acc = sum over the group's blocks, in order, of d_b * (exact int sum of q_x * code)
 *   total += scale * (acc - 8 * sum_x) + zero * sum_x
 * with sum_x the float sum of x over the group: the same in every tiling and batch. */

static inline __attribute__((always_inline)) void b4_tile(
    const uint8_t* blk, int part, int W, const int8_t* xq, const float* d, const float* xsum,
    int64_t K, int64_t G, const uint32_t* sz, int64_t npad, int64_t n0, int MB,
    float* totals) {
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
  const int64_t groups = K / G, nblk = K / QBLOCK;
  const int64_t row0 = part * W * 8; /* first row of the block this pass covers */
  for (int64_t g = 0; g < groups; g++) {
    __m256 acc[2][4];
    for (int m = 0; m < MB; m++)
      for (int i = 0; i < W; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t kb = g * (G / QBLOCK); kb < (g + 1) * (G / QBLOCK); kb++) {
      __m256i sum[2][4];
      for (int m = 0; m < MB; m++)
        for (int i = 0; i < W; i++) sum[m][i] = _mm256_setzero_si256();
      for (int c = 0; c < QBLOCK / 8; c++) {
        const int64_t k = kb * QBLOCK + c * 8;
        const uint8_t* wp = blk + k * 32 + row0 * 4;
        if (MB == 1 && W == 4) _mm_prefetch((const char*)(wp + PREFETCH), _MM_HINT_T0);
        __m256i lo_x[2], hi_x[2];
        for (int m = 0; m < MB; m++) {
          lo_x[m] = _mm256_set1_epi32(*(const int32_t*)(xq + m * K + k));
          hi_x[m] = _mm256_set1_epi32(*(const int32_t*)(xq + m * K + k + 4));
        }
        for (int i = 0; i < W; i++) {
          const __m256i v = _mm256_load_si256((const __m256i*)(wp + i * 32));
          const __m256i lo = _mm256_and_si256(v, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int m = 0; m < MB; m++) {
            sum[m][i] = _mm256_add_epi16(sum[m][i], _mm256_maddubs_epi16(lo, lo_x[m]));
            sum[m][i] = _mm256_add_epi16(sum[m][i], _mm256_maddubs_epi16(hi, hi_x[m]));
          }
        }
      }
      for (int m = 0; m < MB; m++) {
        const __m256 dv = _mm256_set1_ps(d[m * nblk + kb]);
        for (int i = 0; i < W; i++)
          acc[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum[m][i], ones)), dv, acc[m][i]);
      }
    }
    const uint32_t* words = sz + g * npad + n0 + row0;
    for (int i = 0; i < W; i++) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(words + i * 8));
      const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 ze = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int m = 0; m < MB; m++) {
        const float s = xsum[m * groups + g];
        float* t = totals + m * 64 + row0 + i * 8;
        __m256 total = _mm256_loadu_ps(t);
        total = _mm256_fmadd_ps(sc, _mm256_sub_ps(acc[m][i], _mm256_set1_ps(8.0f * s)), total);
        total = _mm256_fmadd_ps(ze, _mm256_set1_ps(s), total);
        _mm256_storeu_ps(t, total);
      }
    }
  }
}

#define B4_TILE_ROWS 32

static void b4_block(const uint8_t* blk, const int8_t* xq, const float* d, const float* xsum,
                     int64_t M, int64_t K, int64_t G, const uint32_t* sz, int64_t npad,
                     int64_t n0, int64_t valid, float* out, int64_t ldo) {
  float totals[B4_TILE_ROWS * 64] __attribute__((aligned(32)));
  const int64_t groups = K / G, nblk = K / QBLOCK;
  for (int64_t r0 = 0; r0 < M; r0 += B4_TILE_ROWS) {
    const int64_t rows = M - r0 < B4_TILE_ROWS ? M - r0 : B4_TILE_ROWS;
    memset(totals, 0, sizeof(float) * (size_t)rows * 64);
    int64_t m = 0;
    for (; m + 2 <= rows; m += 2) /* two rows share each unpacked vector: 16 rows a pass */
      for (int part = 0; part < 4; part++)
        b4_tile(blk, part, 2, xq + (r0 + m) * K, d + (r0 + m) * nblk, xsum + (r0 + m) * groups,
                K, G, sz, npad, n0, 2, totals + m * 64);
    if (m < rows) /* one row: 32 rows a pass, two passes over the block */
      for (int part = 0; part < 2; part++)
        b4_tile(blk, part, 4, xq + (r0 + m) * K, d + (r0 + m) * nblk, xsum + (r0 + m) * groups,
                K, G, sz, npad, n0, 1, totals + m * 64);
    for (int64_t j = 0; j < rows; j++)
      memcpy(out + (r0 + j) * ldo + n0, totals + j * 64, (size_t)valid * sizeof(float));
  }
}

/* x [M, K] times the blocked int4 weight (uint8 [Npad / 64, K / 8, 64, 4]) -> out [M, N];
 * sz: bf16 (scale, zero) words [K / G, Npad]. Returns -1 for a group size that is not a
 * multiple of 32 (nothing computed) or no memory for the quantized activations. */
int OCS_API ocs_b4_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* qb,
                      const uint32_t* sz, int64_t npad, int64_t N, int64_t G, float* out,
                      int64_t ldo, int threads) {
  if (G <= 0 || G % QBLOCK || K % G) return -1;
  const int64_t groups = K / G, nblk = K / QBLOCK;
  const size_t codes = (size_t)(M * K + 63) / 64 * 64; /* the floats after them aligned */
  const size_t bytes = codes + (size_t)(M * nblk + M * groups) * sizeof(float);
  int8_t* xq = (int8_t*)aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (xq == NULL) return -1;
  float* d = (float*)(xq + codes);
  float* xsum = d + M * nblk;
  quantize_rows(x, M, K, ldx, K, xq, NULL, d);
  for (int64_t m = 0; m < M; m++) {
    for (int64_t g = 0; g < groups; g++) {
      const float* xr = x + m * ldx + g * G;
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < G; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xr + k));
      xsum[m * groups + g] = ocs_hsum(a);
    }
  }
  const int64_t blocks = (N + 63) / 64;
  const int vnni = ocs_isa() == 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t n0 = b * 64;
    const int64_t valid = N - n0 < 64 ? N - n0 : 64;
    if (vnni)
      ocs_b4_block_vnni(qb + b * 64 * (K / 2), xq, d, xsum, M, K, G, sz, npad, n0, valid, out,
                        ldo);
    else
      b4_block(qb + b * 64 * (K / 2), xq, d, xsum, M, K, G, sz, npad, n0, valid, out, ldo);
  }
  free(xq);
  return 0;
}

/* x [M, K] times the packed int4 weight -> out [M, N] (N <= Npad, only N columns written).
 * packed: uint8 [Npad, K/2]; sz: bf16 [K/G, Npad, 2]; xsum: float [M, K/G] scratch.
 * Returns -1 (nothing computed) for a group size above W4_MAX_G. */
int OCS_API ocs_w4_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                      const uint8_t* packed, const uint32_t* sz, int64_t npad, int64_t N,
                      int64_t G, float* xsum, float* out, int64_t ldo, int threads) {
  if (G > W4_MAX_G || G <= 0 || K % G) return -1;
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; m++) {
    for (int64_t g = 0; g < groups; g++) {
      const float* xr = x + m * ldx + g * G;
      __m256 a = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= G; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xr + k));
      float s = ocs_hsum(a);
      for (; k < G; k++) s += xr[k];
      xsum[m * groups + g] = s;
    }
  }
  const int64_t blocks = (N + 63) / 64;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t n0 = b * 64;
    const int64_t valid = N - n0 < 64 ? N - n0 : 64;
    w4_block(x, M, ldx, xsum, K, G, packed + b * 64 * (K / 2), sz, npad, n0, valid, out, ldo);
  }
  return 0;
}

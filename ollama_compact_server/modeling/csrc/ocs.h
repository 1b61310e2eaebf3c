/* Shared declarations of the CPU library: weight-only matrix products (ocs_cpu.c) and the
 * decode step of one decoder layer built on them (ocs_decode.c). */
#ifndef OCS_H
#define OCS_H

#include <immintrin.h>
#include <stdint.h>

#define OCS_API __attribute__((visibility("default")))

/* the sum of 8 floats, lanes added pairwise in a fixed order */
static inline float ocs_hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

void ocs_f32_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N,
                float* out, int64_t ldo, int threads);
void ocs_w8_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* q,
               const float* scale, int64_t N, float* out, int64_t ldo, int threads);
int ocs_b8_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* qb,
              const float* scale, int64_t N, float* out, int64_t ldo, int threads);
int ocs_b4_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* qb,
              const uint32_t* sz, int64_t npad, int64_t N, int64_t G, float* out, int64_t ldo,
              int threads);
int ocs_w4_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
              const uint32_t* sz, int64_t npad, int64_t N, int64_t G, float* xsum, float* out,
              int64_t ldo, int threads);

int ocs_isa(void);
/* one block of 64 weight rows of ocs_b8_mm / ocs_b4_mm with AVX512-VNNI (ocs_vnni.c);
 * xc: 128 * each activation block's sum of codes [M, Kp / 32] */
void ocs_b8_block_vnni(const int8_t* blk, const int8_t* xq, const int32_t* xc, const float* d,
                       int64_t M, int64_t Kp, const float* scale, int64_t n0, int64_t valid,
                       float* out, int64_t ldo);
void ocs_b4_block_vnni(const uint8_t* blk, const int8_t* xq, const float* d, const float* xsum,
                       int64_t M, int64_t K, int64_t G, const uint32_t* sz, int64_t npad,
                       int64_t n0, int64_t valid, float* out, int64_t ldo);

/* One stored weight: kind 0 dense float32 [n, k]; 1 int8 [n, k] with float32 scales [n];
 * 2 int4 in torch's 64-row CPU packing with bf16 (scale, zero) words [k / group, npad];
 * 3 int8 blocked (ocs_b8_mm's layout, columns padded to 32) with float32 scales [npad];
 * 4 int4 blocked (ocs_b4_mm's layout) with kind 2's (scale, zero) words. */
typedef struct {
  int32_t kind;
  int32_t group;
  int64_t n, k, npad;
  const void* w;
  const void* s;
  const float* bias; /* [n] or NULL */
} ocs_weight;

/* One decoder layer for decode steps (one new token per row), float32 activations. */
typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, rotary, inter;
  float eps, scale;
  int32_t sandwich;  /* Gemma: norms after attention and after the MLP too */
  int32_t qk_norm;   /* Gemma 3, Qwen 3: RMSNorm of each q and k head */
  int32_t act;       /* 0 silu, 1 gelu (tanh approximation) */
  int32_t window;    /* attend to the last `window` positions only; 0: all */
  int32_t n_qkv;     /* 1 (fused q|k|v) or 3 */
  int32_t n_gate_up; /* 1 (fused gate|up) or 2 */
  const float *in_norm, *q_norm, *k_norm, *post_attn_norm, *pre_ff_norm, *post_ff_norm;
  ocs_weight qkv[3];
  ocs_weight o;
  ocs_weight gate_up[2];
  ocs_weight down;
  float* kcache; /* [slots, kv_heads, capacity, head_dim] */
  float* vcache;
  int64_t capacity;
} ocs_layer;

#endif

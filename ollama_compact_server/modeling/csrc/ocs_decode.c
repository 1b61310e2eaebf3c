/* The decode step of one decoder layer (Llama, Mistral, Qwen 2 / 3, Gemma 3, Phi-3 shapes),
 * float32 activations, B rows of one new token each, over our slot KV cache:
 *
 *   x = norm(h); q, k, v = x W_qkv; [q, k norms]; rope(q, k); k, v -> cache;
 *   a = attention(q, cache); o = a W_o; [o = norm(o)]; h += o;
 *   x = norm(h); g, u = x W_gate_up; y = act(g) * u; d = y W_down; [d = norm(d)]; h += d
 *
 * in one call instead of some sixty torch operations (each of which costs microseconds of
 * dispatch on a small model). Every row is computed on its own, the same way whatever the
 * batch, so a request's result does not depend on what runs beside it. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "ocs.h"

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = ocs_hsum(_mm256_add_ps(s0, s1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* out = x * rsqrt(mean(x^2) + eps) * gain, over n values */
static void rmsnorm(const float* x, const float* gain, float eps, int64_t n, float* out) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = ocs_hsum(acc);
  for (; i < n; i++) ss += x[i] * x[i];
  const float inv = 1.0f / sqrtf(ss / (float)n + eps);
  for (i = 0; i < n; i++) out[i] = (x[i] * inv) * gain[i];
}

/* 0, or -1 when a kernel found no memory for its scratch (the output is then garbage) */
static int matmul(const ocs_weight* W, const float* x, int64_t M, int64_t ldx, float* out,
                  int64_t ldo, float* xsum, int threads) {
  int status = 0;
  if (W->kind == 0) {
    ocs_f32_mm(x, M, W->k, ldx, (const float*)W->w, W->n, out, ldo, threads);
  } else if (W->kind == 1) {
    ocs_w8_mm(x, M, W->k, ldx, (const int8_t*)W->w, (const float*)W->s, W->n, out, ldo,
              threads);
  } else if (W->kind == 3) {
    status = ocs_b8_mm(x, M, W->k, ldx, (const int8_t*)W->w, (const float*)W->s, W->n, out, ldo,
                       threads);
  } else if (W->kind == 4) {
    status = ocs_b4_mm(x, M, W->k, ldx, (const uint8_t*)W->w, (const uint32_t*)W->s, W->npad,
                       W->n, W->group, out, ldo, threads);
  } else {
    ocs_w4_mm(x, M, W->k, ldx, (const uint8_t*)W->w, (const uint32_t*)W->s, W->npad, W->n,
              W->group, xsum, out, ldo, threads);
  }
  if (W->bias) {
    for (int64_t m = 0; m < M; m++)
      for (int64_t j = 0; j < W->n; j++) out[m * ldo + j] += W->bias[j];
  }
  return status;
}

/* rope on the first `rotary` dims of one head vector: transformers' q * cos +
 * rotate_half(q) * sin with rotate_half(q) = [-q[half:], q[:half]] */
static void rope(float* v, const float* cos, const float* sin, int64_t rotary) {
  const int64_t half = rotary / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

static inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
  return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* exp(x) for 8 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p the polynomial of
 * Cephes' expf (about 1 ulp on the range used here). */
static inline __m256 exp8(__m256 x) {
  /* clamped so that 2^n stays a normal float: exp(-87) ~ 1.6e-38 stands in for anything smaller */
  const __m256 hi = _mm256_set1_ps(88.0f), lo = _mm256_set1_ps(-87.0f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1), sign-symmetric, for 8 floats */
static inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), ax)); /* in (0, 1] */
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), e), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  return _mm256_or_ps(t, sign);
}

/* y = act(g) * u over n values (8 at a time, the tail in scalar code) */
static void act_mul(float* g, const float* u, int64_t n, int gelu) {
  int64_t i = 0;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 c = _mm256_set1_ps(0.7978845608028654f), c3 = _mm256_set1_ps(0.044715f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 a;
    if (gelu) {
      const __m256 inner = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, x), _mm256_mul_ps(x, x), x));
      a = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh8(inner)));
    } else {
      a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    }
    _mm256_storeu_ps(g + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) g[i] = (gelu ? gelu_tanh(g[i]) : silu(g[i])) * u[i];
}

/* The model's end for decode rows: final norm, then the head (any weight kind), row by row
 * the same whatever the batch. x: [B, hidden] (overwritten by the normed values); logits:
 * [B, head.n]; xsum: [B, hidden / 16 + 1] scratch for an int4 head. */
int OCS_API ocs_decode_head(const ocs_weight* head, const float* norm, float eps, float* x,
                             int64_t B, int64_t hidden, float* logits, float* xsum,
                             int threads) {
  for (int64_t b = 0; b < B; b++) rmsnorm(x + b * hidden, norm, eps, hidden, x + b * hidden);
  return matmul(head, x, B, hidden, logits, head->n, xsum, threads);
}

static inline int64_t widest_input(const ocs_layer* L) {
  int64_t w = L->hidden > L->inter ? L->hidden : L->inter;
  return w > L->heads * L->head_dim ? w : L->heads * L->head_dim;
}

/* Scratch floats the layer needs for B rows (the caller allocates once per step). */
int64_t OCS_API ocs_decode_scratch(const ocs_layer* L, int64_t B, int threads) {
  const int64_t qkv = (L->heads + 2 * L->kv_heads) * L->head_dim;
  const int64_t widest = widest_input(L);
  const int64_t groups = widest / 16 + 1; /* int4 x-sums (groups of 16 or more) */
  return B * (L->hidden + qkv + L->heads * L->head_dim + 2 * L->inter + L->hidden) +
         B * groups + (int64_t)threads * L->capacity;
}

int OCS_API ocs_decode_layer(const ocs_layer* L, float* h, int64_t B, const int64_t* slots,
                              const int64_t* positions, const float* cos, const float* sin,
                              float* scratch, int threads) {
  const int64_t H = L->hidden, D = L->head_dim, NH = L->heads, KV = L->kv_heads;
  const int64_t QKV = (NH + 2 * KV) * D, groups = NH / KV, cap = L->capacity;
  const int64_t widest = widest_input(L);
  float* x = scratch;                 /* [B, H] */
  float* qkv = x + B * H;             /* [B, QKV] */
  float* att = qkv + B * QKV;         /* [B, NH * D] */
  float* gu = att + B * NH * D;       /* [B, 2 * inter] */
  float* o = gu + B * 2 * L->inter;   /* [B, H] */
  float* xsum = o + B * H;            /* [B, widest / 16 + 1] */
  float* probs = xsum + B * (widest / 16 + 1); /* [threads, capacity] */
  int status = 0;

  for (int64_t b = 0; b < B; b++) rmsnorm(h + b * H, L->in_norm, L->eps, H, x + b * H);
  if (L->n_qkv == 1) {
    status |= matmul(&L->qkv[0], x, B, H, qkv, QKV, xsum, threads);
  } else {
    int64_t offset = 0;
    for (int i = 0; i < 3; i++) {
      status |= matmul(&L->qkv[i], x, B, H, qkv + offset, QKV, xsum, threads);
      offset += L->qkv[i].n;
    }
  }
  /* per row: q / k norms, rope, the new k and v into the cache */
  for (int64_t b = 0; b < B; b++) {
    float* q = qkv + b * QKV;
    float* k = q + NH * D;
    const float* v = k + KV * D;
    const float* c = cos + b * L->rotary;
    const float* s = sin + b * L->rotary;
    for (int64_t head = 0; head < NH; head++) {
      float* qh = q + head * D;
      if (L->qk_norm) rmsnorm(qh, L->q_norm, L->eps, D, qh);
      rope(qh, c, s, L->rotary);
    }
    const int64_t pos = positions[b];
    for (int64_t head = 0; head < KV; head++) {
      float* kh = k + head * D;
      if (L->qk_norm) rmsnorm(kh, L->k_norm, L->eps, D, kh);
      rope(kh, c, s, L->rotary);
      const int64_t at = ((slots[b] * KV + head) * cap + pos) * D;
      memcpy(L->kcache + at, kh, (size_t)D * sizeof(float));
      memcpy(L->vcache + at, v + head * D, (size_t)D * sizeof(float));
    }
  }
  /* attention: each (row, head) over its slot's positions lo..pos */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * NH > 1)
  for (int64_t task = 0; task < B * NH; task++) {
    const int64_t b = task / NH, head = task % NH, kvh = head / groups;
    const int64_t pos = positions[b];
    const int64_t lo = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    const float* qh = qkv + b * QKV + head * D;
    const float* kbase = L->kcache + (slots[b] * KV + kvh) * cap * D;
    const float* vbase = L->vcache + (slots[b] * KV + kvh) * cap * D;
    float* p = probs + (int64_t)omp_get_thread_num() * cap;
    float top = -INFINITY;
    for (int64_t j = lo; j <= pos; j++) {
      p[j] = dot(qh, kbase + j * D, D) * L->scale;
      if (p[j] > top) top = p[j];
    }
    float total = 0.0f;
    int64_t j = lo;
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vtotal = _mm256_setzero_ps();
    for (; j + 8 <= pos + 1; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vtop));
      _mm256_storeu_ps(p + j, e);
      vtotal = _mm256_add_ps(vtotal, e);
    }
    total = ocs_hsum(vtotal);
    for (; j <= pos; j++) {
      p[j] = expf(p[j] - top);
      total += p[j];
    }
    const float inv = 1.0f / total;
    float* out = att + b * NH * D + head * D;
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t j = lo; j <= pos; j++) {
      const __m256 w = _mm256_set1_ps(p[j] * inv);
      const float* vj = vbase + j * D;
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(out + d)));
      for (; d < D; d++) out[d] += p[j] * inv * vj[d];
    }
  }
  status |= matmul(&L->o, att, B, NH * D, o, H, xsum, threads);
  for (int64_t b = 0; b < B; b++) {
    float* hb = h + b * H;
    float* ob = o + b * H;
    if (L->sandwich) rmsnorm(ob, L->post_attn_norm, L->eps, H, ob);
    for (int64_t i = 0; i < H; i++) hb[i] += ob[i];
    rmsnorm(hb, L->pre_ff_norm, L->eps, H, x + b * H);
  }
  const int64_t I = L->inter;
  if (L->n_gate_up == 1) {
    status |= matmul(&L->gate_up[0], x, B, H, gu, 2 * I, xsum, threads);
  } else {
    status |= matmul(&L->gate_up[0], x, B, H, gu, 2 * I, xsum, threads);
    status |= matmul(&L->gate_up[1], x, B, H, gu + I, 2 * I, xsum, threads);
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B > 1)
  for (int64_t b = 0; b < B; b++) {
    float* g = gu + b * 2 * I;
    act_mul(g, g + I, I, L->act == 1);
  }
  status |= matmul(&L->down, gu, B, 2 * I, o, H, xsum, threads);
  for (int64_t b = 0; b < B; b++) {
    float* hb = h + b * H;
    float* ob = o + b * H;
    if (L->sandwich) rmsnorm(ob, L->post_ff_norm, L->eps, H, ob);
    for (int64_t i = 0; i < H; i++) hb[i] += ob[i];
  }
  return status;
}

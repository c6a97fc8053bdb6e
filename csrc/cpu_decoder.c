/* A whole decoder forward over the KV cache on the CPU, fp32, in one call: the Generator's step.
 *
 * A decode step of a small model is ~40 small ops per layer (norms, RoPE, SwiGLU, cache writes,
 * matmuls); from Python each costs more in dispatch than in arithmetic. Here the layers run in C:
 * the matmuls through the BLAS torch itself uses (its sgemm_, passed in as a pointer, called with
 * the arguments torch's mm / addmm pass, so they round as torch's do), attention through se_attend
 * (cpu_attention.c), everything else in the loops below.
 *
 * Numerics. Every element depends only on its own token's row and the cache: the norms' sums run
 * in a fixed order (16 partial sums by index mod 16, then a fixed tree), RoPE, the residual adds
 * and SwiGLU are elementwise, and every matmul runs on a multiple of ROW_ALIGN rows (padding rows
 * repeat the first tokens): MKL rounds a row by its GEMM's row count (M = 1 is a GEMV; on AMD Zen 4
 * fewer than 4 rows, and a thread's share past a multiple of 4, take other kernels; see
 * model/transformer.py, _rows_aligned). So a token's output does not depend on the batch, the chunk
 * it came in or the thread count, as with cpu_attention.c. Against torch's ops it
 * differs only in rounding: the norms' sum order and exp's polynomial (SiLU).
 *
 * Layouts (float32, C-contiguous):
 *   x        (n, hidden)           the token embeddings (read only: the residual stream is scratch)
 *   cos, sin (n, d)                RoPE tables of each token's position (rotate-half convention)
 *   k cache  (layers, slots, kvh, d, cap), v cache (layers, slots, kvh, cap, d): as cpu_attention.c
 *   w        (layers, NW) pointers: per layer the tensors of enum w_t below (NULL where absent)
 *   out      (n, hidden)           the final norm of the last layer's output
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define ROW_ALIGN 4 /* every GEMM's row count is a multiple of this (see the header) */

int64_t se_attend(const float *q, int64_t q_stride, const float *kc, const float *vc, const int64_t *slot,
                  const int64_t *nvis, int64_t n, int64_t H, int64_t kvh, int64_t d, int64_t slots, int64_t cap,
                  float *out, int64_t threads);
int64_t se_append(float *kc, float *vc, const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                  const int64_t *slot, const int64_t *pos, int64_t n, int64_t kvh, int64_t d, int64_t slots,
                  int64_t cap);

/* The Fortran BLAS sgemm (LP64), column-major. */
typedef void (*sgemm_t)(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
                        const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
                        const int *ldc);

/* Per-layer tensors. Matrices are stored (in, out) row-major, as FusedWeights keeps them. */
enum w_t {
  LN1,    /* (hidden,) input norm */
  QKV,    /* (hidden, (H + 2 kvh) d) q, k, v projections side by side */
  QKV_B,  /* ((H + 2 kvh) d,) or NULL */
  QNORM,  /* (d,) per-head q norm (Qwen3) or NULL; with KNORM */
  KNORM,  /* (d,) */
  O,      /* (H d, hidden) */
  O_B,    /* (hidden,) or NULL */
  LN2,    /* (hidden,) post-attention norm */
  GU,     /* (hidden, 2 inter) gate and up side by side */
  GU_B,   /* (2 inter,) or NULL */
  DOWN,   /* (inter, hidden) */
  DOWN_B, /* (hidden,) or NULL */
  NW
};

/* y = x * rsqrt(mean(x^2) + eps) * w over D elements, torch's order of operations; the sum of
 * squares in 16 partial sums by index mod 16 and a fixed tree. y may be x. */
static void rmsnorm(const float *x, const float *w, float *y, int64_t D, float eps) {
  vf acc = splat(0.0f);
  for (int64_t i = 0; i < D; i += W) {
    const vf v = load_n(x + i, D - i < W ? D - i : W);
    acc = acc + v * v;
  }
  const float r = 1.0f / sqrtf(hsum(acc) / (float)D + eps);
  for (int64_t i = 0; i < D; i += W) {
    const int64_t len = D - i < W ? D - i : W;
    store_n(y + i, (load_n(x + i, len) * r) * load_n(w + i, len), len);
  }
}

/* Rotate `heads` heads of d (rotate-half): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, as torch's
 * x * cos + cat(-x2, x1) * sin (a product, a product, a sum: the same roundings). */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
  const int64_t h2 = d / 2;
  for (int64_t j = 0; j < heads; ++j, x += d)
    for (int64_t e = 0; e < h2; ++e) {
      const float a = x[e], b = x[e + h2];
      x[e] = a * cos[e] + (-b) * sin[e];
      x[e + h2] = b * cos[e + h2] + a * sin[e + h2];
    }
}

/* c (n, m) = a (n, k; rows lda apart) @ b (k, m) [+ c if accumulate]: the call torch's mm / addmm
 * make for row-major operands (column-major C^T = B^T A^T). n is a multiple of ROW_ALIGN here. */
static void mm(sgemm_t gemm, int64_t n, int64_t m, int64_t k, const float *a, int64_t lda, const float *b, int accumulate,
               float *c) {
  const int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)m, LDC = (int)m;
  const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  gemm("N", "N", &M, &N, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

/* c (n, m) = bias + a @ b, as torch.addmm(bias, a, b); a plain mm without a bias. */
static void linear(sgemm_t gemm, int64_t n, int64_t m, int64_t k, const float *a, int64_t lda, const float *b,
                   const float *bias, float *c) {
  if (bias)
    for (int64_t i = 0; i < n; ++i) memcpy(c + i * m, bias, m * sizeof(float));
  mm(gemm, n, m, k, a, lda, b, bias != NULL, c);
}

/* x += a @ b (+ bias): without a bias the add happens inside the GEMM (torch.addmm(x, a, b)); with
 * one, x + torch.addmm(bias, a, b), in tmp. */
static void residual(sgemm_t gemm, int64_t n, int64_t m, int64_t k, const float *a, int64_t lda, const float *b,
                     const float *bias, float *x, float *tmp) {
  if (!bias) {
    mm(gemm, n, m, k, a, lda, b, 1, x);
    return;
  }
  linear(gemm, n, m, k, a, lda, b, bias, tmp);
  for (int64_t i = 0; i < n * m; ++i) x[i] = x[i] + tmp[i];
}

/* In place over n rows of [gate | up] (2 inter each): gate <- silu(gate) * up, silu(g) = g / (1 + exp(-g)). */
static void swiglu(float *gu, int64_t n, int64_t inter) {
  for (int64_t i = 0; i < n; ++i) {
    float *g = gu + i * 2 * inter, *u = g + inter;
    for (int64_t j = 0; j < inter; j += W) {
      const int64_t len = inter - j < W ? inter - j : W;
      const vf gv = load_n(g + j, len);
      store_n(g + j, gv / (1.0f + vexp(-gv)) * load_n(u + j, len), len);
    }
  }
}

/* The layers over n rows (a multiple of ROW_ALIGN) of the residual stream x (in: the embeddings); slot / pos / nvis per row
 * (validated by the caller). */
static int64_t decoder_rows(sgemm_t gemm, const float *const *w, const float *final_norm, int64_t L, int64_t hid,
                            int64_t H, int64_t kvh, int64_t d, int64_t inter, float eps, float *x, int64_t n,
                            const float *cos, const float *sin, float *kc, float *vc, int64_t S, int64_t cap,
                            const int64_t *slot, const int64_t *pos, const int64_t *nvis, float *out,
                            int64_t threads, float *buf) {
  const int64_t wq = (H + 2 * kvh) * d;
  float *xn = buf, *qkv = xn + n * hid, *att = qkv + n * wq, *gu = att + n * H * d, *tmp = gu + n * 2 * inter;
  for (int64_t l = 0; l < L; ++l) {
    const float *const *lw = w + l * NW;
    float *lk = kc + l * S * kvh * d * cap, *lv = vc + l * S * kvh * cap * d;
    for (int64_t i = 0; i < n; ++i) rmsnorm(x + i * hid, lw[LN1], xn + i * hid, hid, eps);
    linear(gemm, n, wq, hid, xn, hid, lw[QKV], lw[QKV_B], qkv);
    for (int64_t i = 0; i < n; ++i) {
      float *row = qkv + i * wq;
      if (lw[QNORM]) {
        for (int64_t j = 0; j < H; ++j) rmsnorm(row + j * d, lw[QNORM], row + j * d, d, eps);
        for (int64_t j = H; j < H + kvh; ++j) rmsnorm(row + j * d, lw[KNORM], row + j * d, d, eps);
      }
      rope(row, H + kvh, d, cos + i * d, sin + i * d);
    }
    int64_t rc = se_append(lk, lv, qkv + H * d, wq, qkv + (H + kvh) * d, wq, slot, pos, n, kvh, d, S, cap);
    if (!rc) rc = se_attend(qkv, wq, lk, lv, slot, nvis, n, H, kvh, d, S, cap, att, threads);
    if (rc) return rc;
    residual(gemm, n, hid, H * d, att, H * d, lw[O], lw[O_B], x, tmp);
    for (int64_t i = 0; i < n; ++i) rmsnorm(x + i * hid, lw[LN2], xn + i * hid, hid, eps);
    linear(gemm, n, 2 * inter, hid, xn, hid, lw[GU], lw[GU_B], gu);
    swiglu(gu, n, inter);
    residual(gemm, n, hid, inter, gu, 2 * inter, lw[DOWN], lw[DOWN_B], x, tmp); /* the gate half, rows 2 inter apart */
  }
  for (int64_t i = 0; i < n; ++i) rmsnorm(x + i * hid, final_norm, out + i * hid, hid, eps);
  return 0;
}

/* Run n tokens through L layers: token i is at position pos[i] of cache row slot[i], whose earlier
 * positions hold its sequence's keys and values; its own are written there, layer by layer.
 * Returns 0; 1 + i when token i's slot or position is out of range (checked before anything is
 * written); -1 when scratch memory cannot be had; -2 for a shape the kernels do not take
 * (heads not a multiple of kv heads, odd or > 256 head_dim, cap not a multiple of 16). */
int64_t se_decoder(void *gemm_fn, const float *const *w, const float *final_norm, int64_t L, int64_t hid, int64_t H,
                   int64_t kvh, int64_t d, int64_t inter, float eps, const float *x, int64_t n, const float *cos,
                   const float *sin, float *kc, float *vc, int64_t S, int64_t cap, const int64_t *slot,
                   const int64_t *pos, float *out, int64_t threads) {
  if (n < 1) return 0;
  if (H % kvh || d % 2 || d > 256 || cap % W) return -2;
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] < 0 || slot[i] >= S || pos[i] < 0 || pos[i] >= cap) return 1 + i;
  /* rows padded to a multiple of ROW_ALIGN with copies of tokens 0, 1, ...: a copy computes what its
   * token does (the invariance above) and rewrites the same cache entries with the same values */
  const int64_t r = (n + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
  const int64_t scratch = r * (2 * hid + (H + 2 * kvh) * d + H * d + 2 * inter);
  const int64_t padded = r > n ? r * (hid + 2 * d) : 0; /* out, cos, sin of the padded rows */
  int64_t *sl = malloc(sizeof(int64_t) * 3 * r + sizeof(float) * (r * hid + scratch + padded)), *ps = sl + r, *nv = ps + r;
  if (!sl) return -1;
  float *res = (float *)(nv + r), *buf = res + r * hid, *outr = out;
  const float *cr = cos, *sr = sin;
  for (int64_t i = 0; i < r; ++i) {
    sl[i] = slot[i % n], ps[i] = pos[i % n], nv[i] = pos[i % n] + 1;
    memcpy(res + i * hid, x + (i % n) * hid, hid * sizeof(float));
  }
  if (r > n) {
    float *c2 = buf + scratch, *s2 = c2 + r * d;
    outr = s2 + r * d;
    for (int64_t i = 0; i < r; ++i) {
      memcpy(c2 + i * d, cos + (i % n) * d, d * sizeof(float));
      memcpy(s2 + i * d, sin + (i % n) * d, d * sizeof(float));
    }
    cr = c2, sr = s2;
  }
  const int64_t rc = decoder_rows((sgemm_t)gemm_fn, w, final_norm, L, hid, H, kvh, d, inter, eps, res, r, cr, sr, kc,
                                  vc, S, cap, sl, ps, nv, outr, threads, buf);
  if (!rc && r > n) memcpy(out, outr, n * hid * sizeof(float));
  free(sl);
  return rc;
}

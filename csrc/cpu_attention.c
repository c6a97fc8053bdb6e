/* Cached attention on the CPU, fp32: one query row at a time over its cache row's visible prefix.
 *
 * The Generator's attention (prefill chunks, tool responses, one-token decodes) in one kernel, built
 * at first use by sailor_engine/kernels/native.py (cc -O3 -march=native -ffp-contract=off).
 *
 * Every output element is a fixed function of its own query, its row's first `nvis` keys and values,
 * and nothing else: no sum's order depends on the batch, the chunk a query came in, the longest row,
 * pointer alignment or the vector width the compiler picked. The vectorised loops are elementwise per
 * lane (plain IEEE mul and add, no contraction into FMA, no reassociation), and the two reductions
 * over keys use 16 partial sums indexed by key mod 16, combined in a fixed tree. So a token's output
 * is bit for bit the same in a prefill chunk, in a decode step, alone or beside 127 others, and on
 * any x86 or ARM machine.
 *
 * Layouts (float32, C-contiguous, one layer):
 *   k cache (slots, kvh, d, cap)  keys stored transposed: a query's scores read rows of d
 *   v cache (slots, kvh, cap, d)
 *   q       (n, H, d) rows `q_stride` floats apart; query head j reads kv head j / (H / kvh)
 *   out     (n, H, d) contiguous
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define RMAX 8  /* query rows attended together (heads of one kv head x queries), at most */
#define CMAX 16 /* head_dim / W, at most (head_dim <= 256) */

/* Scores of rows j < R (see attend_head) against nu blocks of W keys from k0, each one sum over d
 * in order, stored in s; lanes past a row's end hold -inf. mx: the rows' running maxima. */
static inline __attribute__((always_inline)) void score_blocks(const float *qs, const float *kt, int64_t k0, int64_t nu,
                                                               int64_t K0, int64_t g, int64_t R, int64_t d, int64_t cap,
                                                               float *s, vf *mx) {
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vf a[4][RMAX];
  for (int64_t u = 0; u < nu; ++u)
    for (int64_t j = 0; j < R; ++j) a[u][j] = splat(0.0f);
  for (int64_t e = 0; e < d; ++e)
    for (int64_t u = 0; u < nu; ++u) {
      const vf kr = load(kt + e * cap + k0 + u * W);
      for (int64_t j = 0; j < R; ++j) a[u][j] = a[u][j] + qs[j * d + e] * kr;
    }
  for (int64_t u = 0; u < nu; ++u)
    for (int64_t j = 0; j < R; ++j) {
      const vi live = lane < (vi){0} + (int32_t)(K0 + j / g - k0 - u * W);
      const vf x = vselect(live, a[u][j], splat(-INFINITY));
      mx[j] = vselect(x > mx[j], x, mx[j]);
      store(s + j * cap + k0 + u * W, x);
    }
}

/* Rows j = t * g + jj: query head jj of one kv head, for m consecutive queries t of one cache row
 * (a prefill chunk; m = 1 in decode), query t seeing keys [0, K0 + t). qs: m * g rows of d,
 * pre-scaled; row j's output goes to out + t * ostride + jj * d. s: scratch, m * g rows of cap.
 * Every sum is in a fixed order: scores over d in order; the softmax denominator in 16 partial sums
 * by key mod 16 and a fixed tree; p @ V in two accumulators by key parity, each in key order. Keys
 * past a row's own end enter as exact zeros (p = 0, and the sums never hold -0), so a query gives the
 * same bits whatever m and t it had: the m rows share each load of K and V, nothing else. */
static inline __attribute__((always_inline)) void attend_head(const float *qs, const float *kt, const float *v,
                                                              int64_t K0, int64_t g, int64_t m, int64_t d,
                                                              int64_t cap, float *s, float *out, int64_t ostride) {
  const int64_t R = g * m, K = K0 + m - 1, kb = (K + W - 1) / W * W, C = (d + W - 1) / W;
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vf mx[RMAX], sum[RMAX];
  for (int64_t j = 0; j < R; ++j) mx[j] = splat(-INFINITY), sum[j] = splat(0.0f);
  /* Scores, U blocks of W keys at a time (then the last blocks one by one): each score is still one
   * sum over d in order, but U * R of them are independent, so the adds' latency overlaps (R alone is
   * 1-2 in decode). */
  const int64_t U = R >= 8 ? 1 : R >= 4 ? 2 : 4;
  int64_t k1 = 0;
  for (; k1 + U * W <= kb; k1 += U * W) score_blocks(qs, kt, k1, U, K0, g, R, d, cap, s, mx);
  for (; k1 < kb; k1 += W) score_blocks(qs, kt, k1, 1, K0, g, R, d, cap, s, mx);
  float inv[RMAX];
  for (int64_t j = 0; j < R; ++j) {
    const vf mj = splat(hmax(mx[j]));
    for (int64_t k0 = 0; k0 < kb; k0 += W) {
      const vi live = lane < (vi){0} + (int32_t)(K0 + j / g - k0);
      const vf p = vselect(live, vexp(load(s + j * cap + k0) - mj), splat(0.0f));
      store(s + j * cap + k0, p);
      sum[j] = sum[j] + p;
    }
    inv[j] = 1.0f / hsum(sum[j]);
  }
  /* d in C chunks of W; a last partial chunk (head_dim not a multiple of 16) is zero-padded on load
   * and cut on store: each lane's arithmetic is the same either way */
  const int64_t rem = d - (C - 1) * W;
  vf acc[2][RMAX][CMAX];
  for (int u = 0; u < 2; ++u)
    for (int64_t j = 0; j < R; ++j)
      for (int64_t c = 0; c < C; ++c) acc[u][j][c] = splat(0.0f);
  for (int64_t k = 0; k < K; k += 2) { /* even keys into acc[0], odd ones into acc[1] */
    const int two = k + 1 < K;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t len = c < C - 1 ? W : rem;
      const vf v0 = load_n(v + k * d + c * W, len), v1 = two ? load_n(v + (k + 1) * d + c * W, len) : splat(0.0f);
      for (int64_t j = 0; j < R; ++j) {
        acc[0][j][c] = acc[0][j][c] + s[j * cap + k] * v0;
        if (two) acc[1][j][c] = acc[1][j][c] + s[j * cap + k + 1] * v1;
      }
    }
  }
  for (int64_t j = 0; j < R; ++j)
    for (int64_t c = 0; c < C; ++c) {
      float o[W];
      store(o, (acc[0][j][c] + acc[1][j][c]) * inv[j]);
      memcpy(out + (j / g) * ostride + (j % g) * d + c * W, o, (c < C - 1 ? W : rem) * sizeof(float));
    }
}

/* Ask for the keys and values a head will read (d rows of K keys, K rows of d values), ahead of use:
 * the cache of a long rollout is far larger than the CPU's caches, and one head's short strided rows
 * alone do not keep enough misses in flight. */
static void prefetch_head(const float *kt, const float *v, int64_t K, int64_t d, int64_t cap) {
  for (int64_t e = 0; e < d; ++e)
    for (int64_t k = 0; k < K; k += W) __builtin_prefetch(kt + e * cap + k);
  for (int64_t x = 0; x < K * d; x += W) __builtin_prefetch(v + x);
}

typedef struct {
  const float *q, *kc, *vc;
  const int64_t *slot, *nvis;
  int64_t q_stride, lo, hi, H, kvh, d, cap;
  float *out;
  int64_t rc;
} job_t;

/* Rows [lo, hi) of a call. Consecutive queries of one cache row at consecutive positions (a
 * prefill chunk) go through attend_head m = RMAX / g at a time, sharing loads; the rest one by one. */
static void *run_rows(void *arg) {
  job_t *jb = arg;
  const int64_t H = jb->H, kvh = jb->kvh, d = jb->d, cap = jb->cap, g = H / kvh;
  const float scale = 1.0f / sqrtf((float)d);
  float *s = malloc(sizeof(float) * (RMAX * cap + RMAX * d));
  if (!s) {
    jb->rc = -1;
    return NULL;
  }
  float *qs = s + RMAX * cap;
  const int64_t M = g <= RMAX ? RMAX / g : 1; /* queries per block */
  for (int64_t i = jb->lo; i < jb->hi;) {
    const int64_t K0 = jb->nvis[i], sl = jb->slot[i];
    int64_t m = 1;
    while (m < M && i + m < jb->hi && jb->slot[i + m] == sl && jb->nvis[i + m] == K0 + m) ++m;
    if (m < M) m = 1; /* blocks of M or single queries: two compiled shapes per (g, d) */
    for (int64_t h = 0; h < kvh; ++h) {
      const float *kt = jb->kc + (sl * kvh + h) * d * cap, *v = jb->vc + (sl * kvh + h) * cap * d;
      { /* the next head's data, while this one computes */
        const int64_t ni = h + 1 < kvh ? i : i + m, nh = h + 1 < kvh ? h + 1 : 0;
        if (ni < jb->hi) {
          const int64_t ns = jb->slot[ni];
          prefetch_head(jb->kc + (ns * kvh + nh) * d * cap, jb->vc + (ns * kvh + nh) * cap * d, jb->nvis[ni], d, cap);
        }
      }
      for (int64_t j0 = 0; j0 < g; j0 += RMAX) { /* query heads in groups of at most RMAX, each on its own */
        const int64_t gg = g - j0 < RMAX ? g - j0 : RMAX;
        for (int64_t t = 0; t < m; ++t)
          for (int64_t j = 0; j < gg * d; ++j) qs[t * gg * d + j] = jb->q[(i + t) * jb->q_stride + (h * g + j0) * d + j] * scale;
        float *o = jb->out + (i * H + h * g + j0) * d;
        /* the common shapes compiled with constant g, m and d: accumulators stay in registers */
#define CASE(G, D)                                                                          \
  if (gg == G && d == D && m == 1) attend_head(qs, kt, v, K0, G, 1, D, cap, s, o, H * d);  \
  else if (gg == G && d == D && m == RMAX / G) attend_head(qs, kt, v, K0, G, RMAX / G, D, cap, s, o, H * d); else
        CASE(1, 64) CASE(2, 32) CASE(2, 64) CASE(2, 128) CASE(4, 64) CASE(4, 128) CASE(6, 128) CASE(7, 64)
        CASE(7, 128) CASE(8, 64) CASE(8, 128) attend_head(qs, kt, v, K0, gg, m, d, cap, s, o, H * d);
#undef CASE
      }
    }
    i += m;
  }
  free(s);
  jb->rc = 0;
  return NULL;
}

#define MAX_THREADS 64
#define KEYS_PER_THREAD 16384 /* query heads x keys a thread must have, at least, to be worth starting */

/* Attention of n query rows over their cache rows: row i reads slot[i]'s first nvis[i] keys.
 * Up to `threads` OpenMP threads, each taking a contiguous range of rows with about equal keys; a
 * row is computed by one thread start to end, so the split changes no result.
 * Returns 0; 1 + i when row i's slot is not in [0, slots) or nvis not in [1, cap] (nothing written);
 * -1 when scratch memory cannot be had; -2 for a shape the kernel does not take (heads not a multiple
 * of kv_heads, head_dim above 256, cap not a multiple of 16). */
int64_t se_attend(const float *q, int64_t q_stride, const float *kc, const float *vc, const int64_t *slot,
                  const int64_t *nvis, int64_t n, int64_t H, int64_t kvh, int64_t d, int64_t slots, int64_t cap,
                  float *out, int64_t threads) {
  if (H % kvh || d < 1 || d > W * CMAX || cap % W) return -2;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (slot[i] < 0 || slot[i] >= slots || nvis[i] < 1 || nvis[i] > cap) return 1 + i;
    total += nvis[i];
  }
  int64_t T = total * H / KEYS_PER_THREAD;
  T = T < threads ? T : threads;
  T = T < MAX_THREADS ? T : MAX_THREADS;
  T = T < n ? T : n;
  job_t jobs[MAX_THREADS];
  const job_t base = {q, kc, vc, slot, nvis, q_stride, 0, n, H, kvh, d, cap, out, 0};
  if (T <= 1) {
    jobs[0] = base;
    run_rows(&jobs[0]);
    return jobs[0].rc;
  }
  int64_t lo = 0, acc = 0;
  for (int64_t t = 0; t < T; ++t) { /* rows up to the t+1-th T-th of the keys */
    int64_t hi = lo;
    while (hi < n && (t == T - 1 || acc < total * (t + 1) / T)) acc += nvis[hi++];
    jobs[t] = base;
    jobs[t].lo = lo, jobs[t].hi = hi;
    lo = hi;
  }
  /* OpenMP: built with -fopenmp, this is the libgomp torch has loaded (same soname), so the rows run
   * on torch's own intra-op team, not on threads competing with its spinning workers */
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int64_t t = 0; t < T; ++t) run_rows(&jobs[t]);
  int64_t rc = 0;
  for (int64_t t = 0; t < T; ++t) rc = rc ? rc : jobs[t].rc;
  return rc;
}

/* Append n new tokens' keys and values: token i goes to slot[i], position pos[i].
 * k, v: (n, kvh, d) rows `k_stride` / `v_stride` floats apart, each head's d values contiguous.
 * Returns 0, or 1 + i when row i's slot or position is out of range (nothing written). */
int64_t se_append(float *kc, float *vc, const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                  const int64_t *slot, const int64_t *pos, int64_t n, int64_t kvh, int64_t d, int64_t slots,
                  int64_t cap) {
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] < 0 || slot[i] >= slots || pos[i] < 0 || pos[i] >= cap) return 1 + i;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < kvh; ++h) {
      float *kt = kc + (slot[i] * kvh + h) * d * cap + pos[i];
      const float *kr = k + i * k_stride + h * d;
      for (int64_t e = 0; e < d; ++e) kt[e * cap] = kr[e];
      memcpy(vc + ((slot[i] * kvh + h) * cap + pos[i]) * d, v + i * v_stride + h * d, d * sizeof(float));
    }
  return 0;
}

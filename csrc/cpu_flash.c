/* Causal attention over packed variable-length sequences on the CPU, fp32: forward and backward.
 *
 * The training attention of a CPU run (model/attention.py VarlenAttention, backend "native"), in
 * FlashAttention-2's tiling: the forward keeps a running max and sum per query row and never holds
 * a whole score matrix; it saves each row's log-sum-exp, from which the backward recomputes the
 * probabilities block by block. torch's CPU flash kernel reaches about a third of two cores' fp32
 * peak at head_dim 32 (the demo model's); here the products are register-tiled small GEMMs on blocks
 * that stay in L1/L2 (about 60% of peak), and each (sequence, kv head) is one job, run start to end
 * by one thread. A sequence whose work alone exceeds a thread's share is cut into jobs of 256
 * queries (forward, dq) and 256 keys (dk, dv): each computes its values exactly as the whole-sequence
 * job does (make_jobs, bwd_task).
 *
 * Layouts (float32, C-contiguous):
 *   q, o, dq, do  (N, H, d)      k, v, dk, dv  (N, kvh, d)      lse  (N, H)
 *   cu            (S + 1,) int64: sequence s holds tokens [cu[s], cu[s+1]), cu[0] = 0, cu[S] = N
 * Query head j reads kv head j / (H / kvh). Token t of a sequence sees its tokens 0..t.
 *
 * Determinism: every sum has a fixed order that depends on the sequence alone (products over d or
 * over a key block in index order; dK, dV and dQ accumulated over blocks in index order), and a job
 * writes only its own rows, so results do not depend on the thread count, the schedule, the split
 * into jobs, or the other sequences of the pack. Plain IEEE mul and add (built with -ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define BQ 16 /* query positions per block: BQ x g rows */
#define BK 64 /* keys per block */

static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

/* Keys [k0, k0 + n) of a block as whole vectors: at most BK. */
static inline int64_t cols(int64_t n) { return n >= BK ? BK : (n + W - 1) / W * W; }

/* x86 with AVX-512: keep v in a register. Left alone, GCC folds each use of a loaded B vector into its
 * multiply as a memory operand, and MR x NV loads a k step make the tile bound by loads, not
 * arithmetic. Only where a vf is one register: with AVX2 or SSE it is two or four, which no asm
 * operand can name (the build would fail), and there it stays a plain value. */
static inline vf pin(vf v) {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__AVX512F__)
  __asm__("" : "+v"(v));
#endif
  return v;
}

/* C[MR x 16 NV] = (acc ? C : 0) + A B over k < K in order. A(r, k) = A[r * ars + k * aks] (either
 * orientation), B rows ldb apart. One element's sum depends on K and its operands alone. */
#define TILE(MR, NV)                                                                                          \
  static inline __attribute__((always_inline)) void tile_##MR##_##NV(                                        \
      float *C, int64_t ldc, const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb, int64_t K, \
      int acc) {                                                                                              \
    vf c[MR][NV];                                                                                             \
    for (int r = 0; r < MR; ++r)                                                                              \
      for (int v = 0; v < NV; ++v) c[r][v] = acc ? load(C + r * ldc + v * W) : splat(0.0f);                   \
    for (int64_t k = 0; k < K; ++k) {                                                                         \
      vf b[NV];                                                                                               \
      for (int v = 0; v < NV; ++v) b[v] = pin(load(B + k * ldb + v * W));                                     \
      for (int r = 0; r < MR; ++r) {                                                                          \
        const float a = A[r * ars + k * aks]; /* broadcast by the vector op (splat adds +0) */            \
        for (int v = 0; v < NV; ++v) c[r][v] = c[r][v] + a * b[v];                                            \
      }                                                                                                       \
    }                                                                                                         \
    for (int r = 0; r < MR; ++r)                                                                              \
      for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, c[r][v]);                                       \
  }
TILE(4, 4)
TILE(1, 4)
TILE(8, 2)
TILE(1, 2)
TILE(8, 1)
TILE(1, 1)

/* C (M x N) = (acc ? C : 0) + A (M x K) B (K x N); N a multiple of W. Columns in chunks of 4, 2 or 1
 * vectors, rows in tiles of 4 or 8 and single rows: 16 accumulators in registers. */
static void gemm(float *C, int64_t ldc, const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb,
                 int64_t M, int64_t N, int64_t K, int acc) {
  for (int64_t v = 0, nv = N / W; v < nv;) {
    const int64_t take = nv - v >= 4 ? 4 : nv - v >= 2 ? 2 : 1;
    float *c = C + v * W;
    const float *b = B + v * W;
    int64_t i = 0;
    if (take == 4) {
      for (; i + 4 <= M; i += 4) tile_4_4(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
      for (; i < M; ++i) tile_1_4(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
    } else if (take == 2) {
      for (; i + 8 <= M; i += 8) tile_8_2(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
      for (; i < M; ++i) tile_1_2(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
    } else {
      for (; i + 8 <= M; i += 8) tile_8_1(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
      for (; i < M; ++i) tile_1_1(c + i * ldc, ldc, A + i * ars, ars, aks, b, ldb, K, acc);
    }
    v += take;
  }
}

/* One task's operands, gathered contiguous: rows r = t * g + jj (token t, query head jj of the group). */
typedef struct {
  int64_t L, Lp, g, d, R;
  float *q;  /* R x d, pre-scaled by 1/sqrt(d) */
  float *kt; /* d x Lp, keys transposed, zero past L */
  float *k;  /* Lp x d */
  float *v;  /* Lp x d */
  float *vt; /* d x Lp (backward) */
  float *s, *p; /* BQ*g x BK scratch: scores (then dP, dS) and probabilities */
} task_t;

static void *alloc(size_t floats) {
  size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
  void *ptr = aligned_alloc(64, bytes ? bytes : 64);
  if (ptr) memset(ptr, 0, bytes ? bytes : 64);
  return ptr;
}

/* Probabilities of block rows [r0, r0 + rows) against keys [k0, k0 + BK) into t->p (rows x BK), from
 * the scores in t->s: exp(s - base[r]) for the keys row r sees, exact 0 for the others; with sums,
 * each row's total (16 partial sums by key mod 16 in key order, then a fixed tree). */
static void visible(const task_t *t, int64_t r0, int64_t rows, int64_t k0, int64_t nc, float *sums, const float *base) {
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = (r0 + r) / t->g; /* token of the row */
    const int32_t nvis = (int32_t)(pos - k0 + 1 < 0 ? 0 : pos - k0 + 1 > BK ? BK : pos - k0 + 1);
    vf acc = splat(0.0f);
    for (int64_t c = 0; c < nc; c += W) {
      vf e = splat(0.0f);
      if (c < nvis) e = vselect(lane < (vi){0} + (nvis - (int32_t)c), vexp(load(t->s + r * BK + c) - base[r]), e);
      store(t->p + r * BK + c, e);
      acc = acc + e;
    }
    if (sums) sums[r] = hsum(acc);
  }
}

static void gather(task_t *t, const float *q, const float *k, const float *v, int64_t t0, int64_t H, int64_t kvh,
                   int64_t h, int backward) {
  const int64_t g = t->g, d = t->d, L = t->L, Lp = t->Lp;
  const float scale = 1.0f / sqrtf((float)d);
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t jj = 0; jj < g; ++jj) {
      const float *src = q + ((t0 + i) * H + h * g + jj) * d;
      float *dst = t->q + (i * g + jj) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * scale;
    }
    const float *kr = k + ((t0 + i) * kvh + h) * d, *vr = v + ((t0 + i) * kvh + h) * d;
    for (int64_t e = 0; e < d; ++e) t->kt[e * Lp + i] = kr[e];
    memcpy(t->v + i * d, vr, d * sizeof(float));
    if (backward) {
      memcpy(t->k + i * d, kr, d * sizeof(float));
      for (int64_t e = 0; e < d; ++e) t->vt[e * Lp + i] = vr[e];
    }
  }
}

static int task_alloc(task_t *t, int64_t L, int64_t g, int64_t d, int backward) {
  memset(t, 0, sizeof *t);
  t->L = L, t->Lp = (L + BK - 1) / BK * BK, t->g = g, t->d = d, t->R = L * g;
  t->q = alloc(t->R * d), t->kt = alloc(d * t->Lp), t->v = alloc(t->Lp * d);
  t->s = alloc(BQ * g * BK), t->p = alloc(BQ * g * BK);
  if (backward) t->k = alloc(t->Lp * d), t->vt = alloc(d * t->Lp);
  return t->q && t->kt && t->v && t->s && t->p && (!backward || (t->k && t->vt));
}

static void task_free(task_t *t) {
  free(t->q), free(t->kt), free(t->k), free(t->v), free(t->vt), free(t->s), free(t->p);
}

/* Forward of the queries [lo, hi) of sequence tokens [t0, t0 + L), kv head h (lo a multiple of BQ).
 * A query's result depends on its sequence alone, never on [lo, hi). Returns 0 or -1 (out of memory). */
static int fwd_task(const float *q, const float *k, const float *v, float *o, float *lse, int64_t t0, int64_t L,
                    int64_t H, int64_t kvh, int64_t d, int64_t h, int64_t lo, int64_t hi) {
  const int64_t g = H / kvh;
  task_t t;
  float *acc = alloc(BQ * g * d), *m = alloc(BQ * g), *l = alloc(BQ * g), *sums = alloc(BQ * g);
  int ok = task_alloc(&t, L, g, d, 0) && acc && m && l && sums;
  if (ok) {
    gather(&t, q, k, v, t0, H, kvh, h, 0);
    for (int64_t p0 = lo; p0 < hi; p0 += BQ) {
      const int64_t np = L - p0 < BQ ? L - p0 : BQ, rows = np * g, r0 = p0 * g;
      const float *qb = t.q + r0 * d;
      for (int64_t k0 = 0; k0 < p0 + np; k0 += BK) {
        const int64_t nc = cols(p0 + np - k0); /* keys some row of the block sees, in whole vectors */
        gemm(t.s, BK, qb, d, 1, t.kt + k0, t.Lp, rows, nc, d, 0); /* scores: one sum over d each */
        float mx[BQ * 16];
        const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        for (int64_t r = 0; r < rows; ++r) { /* the row's new max over what it sees */
          const int64_t pos = p0 + r / g;
          const int32_t nvis = (int32_t)(pos - k0 + 1 > BK ? BK : pos - k0 + 1);
          vf best = splat(-INFINITY);
          for (int64_t c = 0; c < nvis; c += W)
            best = vmax(best, vselect(lane < (vi){0} + (nvis - (int32_t)c), load(t.s + r * BK + c), splat(-INFINITY)));
          const float x = hmax(best);
          mx[r] = k0 && m[r] > x ? m[r] : x;
        }
        visible(&t, r0, rows, k0, nc, sums, mx);
        for (int64_t r = 0; r < rows; ++r) {
          if (k0 == 0) {
            l[r] = sums[r];
          } else {
            const float alpha = expf(m[r] - mx[r]);
            l[r] = l[r] * alpha + sums[r];
            for (int64_t e = 0; e < d; ++e) acc[r * d + e] *= alpha;
          }
          m[r] = mx[r];
        }
        gemm(acc, d, t.p, BK, 1, t.v + k0 * d, d, rows, d, nc, k0 != 0); /* O (+)= P V */
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = (t0 + p0 + r / g) * H + h * g + r % g;
        const float inv = 1.0f / l[r];
        for (int64_t e = 0; e < d; ++e) o[row * d + e] = acc[r * d + e] * inv;
        lse[row] = m[r] + logf(l[r]);
      }
    }
  }
  task_free(&t);
  free(acc), free(m), free(l), free(sums);
  return ok ? 0 : -1;
}

/* Backward of sequence tokens [t0, t0 + L), kv head h. parts: 1 = dk, dv of the keys [lo, hi);
 * 2 = dq of the queries [lo, hi); 3 = all of them (lo = 0, hi = L). lo is a multiple of BK. Every
 * part computes each of its values exactly as part 3 does (the same blocks, sums in the same order):
 * splitting a long sequence into parts 1 and 2 over chunks changes no bit. It costs the recomputation
 * of S, P and dP for the dq parts, so it is only for sequences too long to leave the other threads
 * their share. */
static int bwd_task(const float *q, const float *k, const float *v, const float *o, const float *lse, const float *dout,
                    float *dq, float *dk, float *dv, int64_t t0, int64_t L, int64_t H, int64_t kvh, int64_t d,
                    int64_t h, int64_t lo, int64_t hi, int parts) {
  const int64_t g = H / kvh, R = L * g;
  const int64_t k_lo = parts == 2 ? 0 : lo, k_hi = hi, p_lo = parts == 2 ? lo : 0, p_hi = parts == 2 ? hi : L;
  task_t t;
  float *dO = alloc(R * d), *dQ = alloc(R * d), *D = alloc(R), *ls = alloc(R);
  float *dKb = alloc(BK * d), *dVb = alloc(BK * d);
  int ok = task_alloc(&t, L, g, d, 1) && dO && dQ && D && ls && dKb && dVb;
  if (ok) {
    gather(&t, q, k, v, t0, H, kvh, h, 1);
    for (int64_t r = 0; r < R; ++r) { /* dO rows, D = rowsum(dO * O) in a fixed order, lse */
      const int64_t row = (t0 + r / g) * H + h * g + r % g;
      memcpy(dO + r * d, dout + row * d, d * sizeof(float));
      float s = 0.0f;
      for (int64_t e = 0; e < d; ++e) s += dout[row * d + e] * o[row * d + e];
      D[r] = s, ls[r] = lse[row];
    }
    for (int64_t k0 = k_lo; k0 < k_hi; k0 += BK) {
      const int64_t diag = k0 / BQ * BQ, first = diag > p_lo ? diag : p_lo; /* query blocks with a token >= k0 */
      memset(dKb, 0, BK * d * sizeof(float));
      memset(dVb, 0, BK * d * sizeof(float));
      for (int64_t p0 = first; p0 < p_hi; p0 += BQ) {
        const int64_t np = L - p0 < BQ ? L - p0 : BQ, rows = np * g, r0 = p0 * g;
        const int64_t nc = cols(p0 + np - k0);
        gemm(t.s, BK, t.q + r0 * d, d, 1, t.kt + k0, t.Lp, rows, nc, d, 0); /* S */
        visible(&t, r0, rows, k0, nc, NULL, ls + r0);                       /* P = exp(S - lse) */
        if (parts & 1) gemm(dVb, d, t.p, 1, BK, dO + r0 * d, d, nc, d, rows, 1); /* dV += P^T dO */
        gemm(t.s, BK, dO + r0 * d, d, 1, t.vt + k0, t.Lp, rows, nc, d, 0);  /* dP = dO V^T */
        for (int64_t r = 0; r < rows; ++r) {                                /* dS = P (dP - D) */
          const vf Dr = splat(D[r0 + r]);
          for (int64_t c = 0; c < nc; c += W)
            store(t.s + r * BK + c, load(t.p + r * BK + c) * (load(t.s + r * BK + c) - Dr));
        }
        if (parts & 1) gemm(dKb, d, t.s, 1, BK, t.q + r0 * d, d, nc, d, rows, 1); /* dK += dS^T (scale Q) */
        if (parts & 2) gemm(dQ + r0 * d, d, t.s, BK, 1, t.k + k0 * d, d, rows, d, nc, 1); /* dQ += dS K */
      }
      const int64_t nk = L - k0 < BK ? L - k0 : BK;
      for (int64_t c = 0; c < nk && (parts & 1); ++c) {
        memcpy(dk + ((t0 + k0 + c) * kvh + h) * d, dKb + c * d, d * sizeof(float));
        memcpy(dv + ((t0 + k0 + c) * kvh + h) * d, dVb + c * d, d * sizeof(float));
      }
    }
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t r = p_lo * g; r < p_hi * g && (parts & 2); ++r) {
      const int64_t row = (t0 + r / g) * H + h * g + r % g;
      for (int64_t e = 0; e < d; ++e) dq[row * d + e] = dQ[r * d + e] * scale;
    }
  }
  task_free(&t);
  free(dO), free(dQ), free(D), free(ls), free(dKb), free(dVb);
  return ok ? 0 : -1;
}

/* One job: a (sequence, kv head), whole or a chunk of its queries (forward, backward part 2) or keys
 * (backward part 1). */
typedef struct {
  int64_t s, h, lo, hi, parts, cost;
} job_t;

static int by_cost(const void *a, const void *b) { /* descending cost, then ascending position: a fixed order */
  const job_t *x = a, *y = b;
  if (x->cost != y->cost) return x->cost < y->cost ? 1 : -1;
  const int64_t kx[4] = {x->s, x->h, x->parts, x->lo}, ky[4] = {y->s, y->h, y->parts, y->lo};
  for (int i = 0; i < 4; ++i)
    if (kx[i] != ky[i]) return kx[i] < ky[i] ? -1 : 1;
  return 0;
}

/* The jobs of a call, costliest first; checks cu. split: 0 whole sequences; > 0 (a multiple of BK)
 * chunks of that many tokens for every sequence longer; -1 chunks of SPLIT tokens for the sequences
 * whose work alone exceeds a thread's share (the others whole). Results do not depend on it.
 * Returns the count; -3 for a bad cu, -2 for a bad split, -1 out of memory. */
#define SPLIT 256
static int64_t make_jobs(const int64_t *cu, int64_t S, int64_t N, int64_t kvh, int64_t split, int64_t threads,
                         int backward, job_t **out) {
  if (cu[0] != 0 || cu[S] != N) return -3;
  for (int64_t s = 0; s < S; ++s)
    if (cu[s + 1] < cu[s]) return -3;
  if (split < -1 || (split > 0 && split % BK)) return -2;
  double total = 0.0; /* work ~ L^2 per (sequence, kv head) */
  for (int64_t s = 0; s < S; ++s) total += (double)(cu[s + 1] - cu[s]) * (double)(cu[s + 1] - cu[s]) * kvh;
  const double share = total / (threads < 1 ? 1 : threads);
  int64_t n = 0, cap = 16;
  job_t *jobs = malloc(cap * sizeof *jobs);
  for (int64_t s = 0; s < S && jobs; ++s) {
    const int64_t L = cu[s + 1] - cu[s];
    int64_t c = split == -1 ? ((double)L * (double)L > share ? SPLIT : 0) : split;
    if (L == 0) continue;
    if (c == 0 || L <= c) c = L;
    /* the forward: part 0; the backward: part 3 whole, parts 1 (keys) and 2 (queries) in chunks */
    const int first = !backward ? 0 : c == L ? 3 : 1, last = !backward ? 0 : c == L ? 3 : 2;
    for (int64_t h = 0; h < kvh && jobs; ++h)
      for (int part = first; part <= last && jobs; ++part)
        for (int64_t lo = 0; lo < L && jobs; lo += c) {
          const int64_t hi = lo + c < L ? lo + c : L;
          if (n == cap) {
            job_t *grown = realloc(jobs, 2 * cap * sizeof *jobs);
            if (!grown) free(jobs);
            jobs = grown, cap *= 2;
            if (!jobs) break;
          }
          /* keys [lo, hi) meet the queries from lo to L; queries [lo, hi) meet the keys before hi */
          const int64_t cost = part == 1 ? (hi - lo) * (2 * L - lo - hi) : (hi - lo) * (lo + hi);
          jobs[n++] = (job_t){s, h, lo, hi, part, cost};
        }
  }
  if (!jobs) return -1;
  qsort(jobs, n, sizeof *jobs, by_cost);
  *out = jobs;
  return n;
}

static int shape_ok(int64_t H, int64_t kvh, int64_t d) {
  return kvh >= 1 && H % kvh == 0 && H / kvh <= 16 && d % W == 0 && d <= 256;
}

/* Forward. o, lse: outputs. split: as make_jobs (-1: automatic). Returns 0; -1 out of memory; -2
 * unsupported shape (H not a multiple of kvh, more than 16 query heads per kv head, d not a multiple
 * of 16 or above 256) or split; -3 cu not 0 = cu[0] <= ... <= cu[S] = N. */
int64_t se_flash_fwd(const float *q, const float *k, const float *v, const int64_t *cu, int64_t S, int64_t N,
                     int64_t H, int64_t kvh, int64_t d, float *o, float *lse, int64_t split, int64_t threads) {
  if (!shape_ok(H, kvh, d)) return -2;
  job_t *jobs = NULL;
  const int64_t n = make_jobs(cu, S, N, kvh, split, threads, 0, &jobs);
  if (n < 0) return n;
  int64_t rc = 0;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(dynamic, 1) reduction(min : rc)
  for (int64_t i = 0; i < n; ++i) {
    const job_t j = jobs[i];
    const int64_t r = fwd_task(q, k, v, o, lse, cu[j.s], cu[j.s + 1] - cu[j.s], H, kvh, d, j.h, j.lo, j.hi);
    rc = r < rc ? r : rc;
  }
  free(jobs);
  return rc;
}

/* Backward from the forward's o and lse and the output gradient dout: dq, dk, dv. Returns as se_flash_fwd. */
int64_t se_flash_bwd(const float *q, const float *k, const float *v, const float *o, const float *lse,
                     const float *dout, const int64_t *cu, int64_t S, int64_t N, int64_t H, int64_t kvh, int64_t d,
                     float *dq, float *dk, float *dv, int64_t split, int64_t threads) {
  if (!shape_ok(H, kvh, d)) return -2;
  job_t *jobs = NULL;
  const int64_t n = make_jobs(cu, S, N, kvh, split, threads, 1, &jobs);
  if (n < 0) return n;
  int64_t rc = 0;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(dynamic, 1) reduction(min : rc)
  for (int64_t i = 0; i < n; ++i) {
    const job_t j = jobs[i];
    const int64_t r = bwd_task(q, k, v, o, lse, dout, dq, dk, dv, cu[j.s], cu[j.s + 1] - cu[j.s], H, kvh, d, j.h,
                               j.lo, j.hi, (int)j.parts);
    rc = r < rc ? r : rc;
  }
  free(jobs);
  return rc;
}

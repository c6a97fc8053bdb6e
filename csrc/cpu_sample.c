/* The generator's sampling step on the CPU, fp32: logits (R, V) -> one token and its log-prob per row.
 *
 * torch spends ~10 us per row of a 4096-token vocabulary on it (max with indices, log_softmax,
 * exp, cumsum, searchsorted: five passes, each writing an (R, V) tensor); these are two passes over
 * a row, or three for a sampled one, and write nothing but the results.
 *
 * Row r, with y = z (greedy, temp[r] == 0) or y = z / temp[r] (sampled, temp[r] > 0):
 *   m = max y, s = sum exp(y - m), log p(i) = (y_i - m) - log s      (log_softmax's operations)
 *   greedy:  token = the first index of m (argmax's tie rule), found in pass 1
 *   sampled: inverse CDF, token = the first i whose running sum of exp(y - m) exceeds u[r] * s
 *            (u in [0, 1)); every token with exp(y_i - m) > 0 can be drawn, no other.
 * exp's arguments below -87 count as 0 (exp there is subnormal, ~50x slower on x86, and below one
 * ulp of s >= 1). s is summed in blocks of 256 tokens (16 lanes, then a fixed tree: vec.h hsum),
 * the blocks in double, in order; the draw walks the same block sums, then exps one block again in
 * order (in double). So every result depends on its row alone, and not on R or the thread count.
 * A row whose maximum is not finite (a NaN, +inf, or every logit -inf) gets token = the first NaN or
 * +inf (else 0) and log-prob NaN, as torch's path gives NaN there: the trainer's guards see it.
 * Against torch's ops the log-probs differ in rounding only (~1e-7): exp's polynomial and s's order.
 *
 * Layout: z (R, V) with rows ldz floats apart; temp (R,); u (R,); tokens (R,) int64; logps (R,).
 * Returns 0; -1 when scratch memory cannot be had; -2 for V < 1 or ldz < V; 1 + r for a negative or
 * NaN temp[r], or a u[r] outside [0, 1) on a sampled row.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

#define BLOCK 256 /* tokens per block sum: 16 vectors */

static inline vf vexp0(vf x) { return vselect(x < splat(-87.0f), splat(0.0f), vexp(x)); }

static inline float yval(const float *z, int64_t i, float temp, int scaled) { return scaled ? z[i] / temp : z[i]; }

/* exp(y_i - m) of the tokens [b0, b1) (at most BLOCK) into e, and their sum: 16 lanes, then a fixed tree. */
static float block_exp(const float *z, int64_t b0, int64_t b1, float temp, int scaled, float m, float *e) {
  vf acc = splat(0.0f);
  for (int64_t i = b0; i < b1; i += W) {
    const int64_t len = b1 - i < W ? b1 - i : W;
    vf y = load_n(z + i, len);
    if (scaled) y = y / splat(temp);
    vf x = vexp0(y - m);
    for (int64_t l = len; l < W; ++l) x[l] = 0.0f; /* lanes past the row */
    store(e + (i - b0), x);
    acc += x;
  }
  return hsum(acc);
}

/* One row; returns 0 or 1 (bad temp / u). */
static int row(const float *z, int64_t V, float temp, float u, double *blocks, int64_t *token, float *logp) {
  const int scaled = temp > 0.0f && temp != 1.0f;
  if (!(temp >= 0.0f) || (temp > 0.0f && !(u >= 0.0f && u < 1.0f))) return 1;
  /* pass 1: the max and its first index (per lane, the first index of the lane's max; then the
   * smallest of the lanes holding the row's max), and whether any value is NaN or +inf */
  float m = -INFINITY;
  int64_t bad = -1, t = 0;
  {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf mv = splat(-INFINITY);
    vi nf = (vi){0}, at = lane, cur = lane;
    int64_t i = 0;
    for (; i + W <= V; i += W, cur += W) {
      vf y = load(z + i);
      if (scaled) y = y / splat(temp);
      nf |= (y != y) | (y == splat(INFINITY));
      const vi up = y > mv;
      mv = vselect(up, y, mv);
      at = (cur & up) | (at & ~up);
    }
    m = hmax(mv);
    int any = 0;
    t = V; /* (indices < 2^31: V is a vocabulary) */
    for (int l = 0; l < W; ++l) {
      any |= nf[l];
      if (mv[l] == m && at[l] < t) t = at[l];
    }
    for (; i < V; ++i) { /* past every vector: a tie keeps the earlier index */
      const float y = yval(z, i, temp, scaled);
      any |= y != y || y == INFINITY;
      if (y > m) m = y, t = i;
    }
    if (any || m == -INFINITY) {
      for (int64_t j = 0; j < V && bad < 0; ++j) {
        const float y = yval(z, j, temp, scaled);
        if (y != y || y == INFINITY) bad = j;
      }
      *token = bad < 0 ? 0 : bad;
      *logp = NAN;
      return 0;
    }
  }
  /* pass 2: s, by blocks */
  const int64_t nb = (V + BLOCK - 1) / BLOCK;
  float e[BLOCK];
  double s = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t b1 = (b + 1) * BLOCK < V ? (b + 1) * BLOCK : V;
    blocks[b] = block_exp(z, b * BLOCK, b1, temp, scaled, m, e);
    s += blocks[b];
  }
  if (temp > 0.0f) {
    /* pass 3: the block where the running sum passes u s (its sum is > 0: s is the same sum of the
     * same blocks), then its tokens' exps in order; t (the argmax) is always replaced */
    const double target = (double)u * s;
    double run = 0.0;
    int64_t b = 0;
    while (b < nb - 1 && run + blocks[b] <= target) run += blocks[b++];
    const int64_t b0 = b * BLOCK, b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
    block_exp(z, b0, b1, temp, scaled, m, e);
    for (int64_t i = b0; i < b1; ++i) {
      if (e[i - b0] == 0.0f) continue;
      t = i; /* the last positive one so far: the draw if rounding leaves the walk short of the target */
      run += e[i - b0];
      if (run > target) break;
    }
  }
  const float log_s = logf((float)s);
  const float yt = yval(z, t, temp, scaled);
  *token = t;
  *logp = (yt - m) - log_s;
  return 0;
}

int64_t se_sample(const float *z, int64_t R, int64_t V, int64_t ldz, const float *temp, const float *u,
                  int64_t *tokens, float *logps, int64_t threads) {
  if (R < 1) return 0;
  if (V < 1 || ldz < V) return -2;
  const int64_t nb = (V + BLOCK - 1) / BLOCK;
  double *blocks = malloc(sizeof(double) * nb * R);
  if (!blocks) return -1;
  int64_t rc = 0;
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && R * V >= (1 << 18))
  for (int64_t r = 0; r < R; ++r)
    if (row(z + r * ldz, V, temp[r], u[r], blocks + r * nb, tokens + r, logps + r)) {
#pragma omp critical
      if (!rc || 1 + r < rc) rc = 1 + r;
    }
  free(blocks);
  return rc;
}

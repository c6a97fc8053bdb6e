/* 16-float vectors for the C kernels (GCC / clang vector extensions), and the few helpers they share.
 *
 * A vf is lowered to whatever the target has (one AVX-512 register, two AVX2, four SSE / NEON);
 * operations on it are elementwise IEEE (the kernels build with -ffp-contract=off: no FMA
 * contraction, no reassociation), so results do not depend on that choice. */
#ifndef SAILOR_VEC_H
#define SAILOR_VEC_H

#include <stdint.h>
#include <string.h>

#define W 16
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* The first `len` <= W floats (zeros past them on load). */
static inline vf load_n(const float *p, int64_t len) {
  if (len == W) return load(p);
  vf v = splat(0.0f);
  memcpy(&v, p, len * sizeof(float));
  return v;
}
static inline void store_n(float *p, vf v, int64_t len) {
  if (len == W) store(p, v);
  else memcpy(p, &v, len * sizeof(float));
}

/* exp(x) to ~2 ulp: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2]. Arguments are clamped to
 * [-87, 88]: results are never subnormal (no microcode assists; exp(-87) ~ 1.6e-38 is below one ulp
 * of any sum >= 1 it enters) nor infinite. */
static inline vf vexp(vf x) {
  x = vselect(x < splat(-87.0f), splat(-87.0f), x);
  x = vselect(x > splat(88.0f), splat(88.0f), x);
  vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
  vf r = x - n * 0.693145751953125f; /* ln 2 split: the high part has 16 bits, so n * hi is exact */
  r = r - n * 1.42860682030941723212e-6f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)e;
}

/* Sum and max of the lanes in a fixed tree (the max is exact in any order). */
static inline float hsum(vf a) {
  float b[W];
  store(b, a);
  for (int l = 0; l < 8; ++l) b[l] += b[l + 8];
  for (int l = 0; l < 4; ++l) b[l] += b[l + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}
static inline float hmax(vf a) {
  float b[W], m;
  store(b, a);
  m = b[0];
  for (int l = 1; l < W; ++l) m = b[l] > m ? b[l] : m;
  return m;
}

#endif

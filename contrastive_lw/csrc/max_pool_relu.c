/* The CPU kernels of model._MatmulReluMaxPool: ReLU of a max-pool over all of a small convolution
 * output's positions (plus a per-channel bias), and the weight and bias gradients, which only the
 * winning positions receive. In PyTorch they are a max-pool, an add, a clamp, then a ReLU mask, a
 * zero fill, a scatter and a dense matmul of which 1 - 1 / positions of the terms are zeros. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* x: n x positions x channels (contiguous). best[i][c] = relu(max_p x[i][p][c] + bias[c]); where[i][c]
 * = the first p holding the max (a NaN wins and stays NaN, as in max_pool2d and clamp_min).
 * Returns 0, or -1 when out of memory. */
int max_pool_relu(int64_t n, int64_t positions, int64_t channels, const float *x, const float *bias,
                  float *best, uint8_t *where) {
  int failed = 0;
#pragma omp parallel
  {
    float *m = malloc(channels * sizeof(float)); /* per thread: the max and its position so far */
    int32_t *at = malloc(channels * sizeof(int32_t));
    if (!m || !at) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (!m || !at) continue;
      const float *restrict xi = x + i * positions * channels;
      for (int64_t c = 0; c < channels; ++c) m[c] = xi[c], at[c] = 0;
      for (int64_t p = 1; p < positions; ++p) /* channels innermost: vectorised */
        for (int64_t c = 0; c < channels; ++c) {
          const float v = xi[p * channels + c];
          const int wins = (v > m[c]) | (isnan(v) & !isnan(m[c]));
          m[c] = wins ? v : m[c];
          at[c] = wins ? (int32_t)p : at[c];
        }
      float *restrict bi = best + i * channels;
      uint8_t *restrict wi = where + i * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const float y = m[c] + bias[c];
        bi[c] = y <= 0 ? 0 : y; /* NaN <= 0 is false: NaN stays NaN */
        wi[c] = (uint8_t)at[c];
      }
    }
    free(m);
    free(at);
  }
  return failed ? -1 : 0;
}

/* The backward adds the terms of PATCHES patches per pass over a gradient row (each load and store
 * of the row serves PATCHES multiply-adds), in vectors of LANES floats (the compiler splits them
 * where the CPU's are narrower). */
#define PATCHES 8
#define LANES 16
typedef float vec __attribute__((vector_size(4 * LANES)));

static inline vec load(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* sums (one thread's gw, tails, gb) += the terms of a group of PATCHES patches: for each channel c,
 * g[j][c] times patch j's winning window of c (rows of features columns), and g[j][c]. Columns past
 * a row's last whole vector come from one vector ending at the row's end, overlapping the one before
 * it: they are summed apart, in tails (LANES a channel). */
static void add_group(int64_t channels, int64_t features, const float *const *patch,
                      const uint8_t *const *winner, const float *restrict g, float *restrict sums) {
  float *restrict tails = sums + channels * features, *restrict gb = tails + channels * LANES;
  for (int64_t c = 0; c < channels; ++c) {
    const float *row[PATCHES];
    float gc[PATCHES];
    for (int j = 0; j < PATCHES; ++j) {
      row[j] = patch[j] + winner[j][c] * features, gc[j] = g[j * channels + c];
      gb[c] += gc[j];
    }
    float *restrict out = sums + c * features;
    if (features < LANES) {
      for (int j = 0; j < PATCHES; ++j)
        for (int64_t k = 0; k < features; ++k) out[k] += gc[j] * row[j][k];
      continue;
    }
    for (int64_t k = 0; k + LANES <= features; k += LANES) {
      vec sum = load(out + k);
      for (int j = 0; j < PATCHES; ++j) sum += gc[j] * load(row[j] + k);
      store(out + k, sum);
    }
    float *restrict tail = tails + c * LANES;
    vec sum = load(tail);
    for (int j = 0; j < PATCHES; ++j) sum += gc[j] * load(row[j] + features - LANES);
    store(tail, sum);
  }
}

/* The gradients of the weight and bias of relu(max_p (windows @ weight^T)[i][p][c] + bias[c]) from the
 * output's gradient grad (n x channels), the output best and the winners where (max_pool_relu's):
 * grad_weight[c] = sum_i g[i][c] windows[i][where[i][c]], grad_bias[c] = sum_i g[i][c], with
 * g = grad where best > 0, else 0 (NaN where best is NaN). windows: n x positions x features,
 * grad_weight: channels x features. Only the winning window of each output gets a gradient: 1 /
 * positions of the dense product windows^T @ (gradient scattered to the positions), and patches
 * with no gradient at all (a triplet within its margin) add nothing. The sums run per thread in a
 * fixed split, then in thread order: the same result for the same thread count. Returns 0, or -1
 * when out of memory. */
int max_pool_relu_backward(int64_t n, int64_t positions, int64_t channels, int64_t features,
                           const float *windows, const float *grad, const float *best, const uint8_t *where,
                           float *grad_weight, float *grad_bias) {
  /* the columns summed in gw; the rest are in tails */
  const int64_t whole = features >= LANES ? features / LANES * LANES : features;
  const int64_t size = channels * (features + LANES + 1); /* one thread's gw, tails, gb */
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  float *partial = calloc(threads * size, sizeof(float));
  float *gradients = malloc(threads * PATCHES * channels * sizeof(float));
  if (!partial || !gradients) {
    free(partial);
    free(gradients);
    return -1;
  }
#pragma omp parallel num_threads(threads)
  {
    int thread = 0;
#ifdef _OPENMP
    thread = omp_get_thread_num();
#endif
    float *restrict sums = partial + thread * size, *restrict g = gradients + thread * PATCHES * channels;
    const float *patch[PATCHES]; /* the group's patches: their windows, winners and gradients g */
    const uint8_t *winner[PATCHES];
    int filled = 0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float *restrict gi = g + filled * channels;
      int any = 0;
      for (int64_t c = 0; c < channels; ++c) {
        const float b = best[i * channels + c];
        gi[c] = b > 0 ? grad[i * channels + c] : b; /* b is 0 or NaN where the ReLU cut */
        any |= gi[c] != 0;
      }
      if (!any) continue; /* e.g. a triplet within the margin: no gradient at all */
      patch[filled] = windows + i * positions * features, winner[filled] = where + i * channels;
      if (++filled == PATCHES) {
        add_group(channels, features, patch, winner, g, sums);
        filled = 0;
      }
    }
    if (filled) {
      for (int j = filled; j < PATCHES; ++j) { /* padding: the first patch again, with no gradient */
        patch[j] = patch[0], winner[j] = winner[0];
        for (int64_t c = 0; c < channels; ++c) g[j * channels + c] = 0;
      }
      add_group(channels, features, patch, winner, g, sums);
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t k = 0; k < features; ++k) {
      float sum = 0;
      for (int t = 0; t < threads; ++t)
        sum += k < whole ? partial[t * size + c * features + k]
                         : partial[t * size + channels * features + c * LANES + k - (features - LANES)];
      grad_weight[c * features + k] = sum;
    }
    float sum = 0;
    for (int t = 0; t < threads; ++t) sum += partial[t * size + channels * (features + LANES) + c];
    grad_bias[c] = sum;
  }
  free(partial);
  free(gradients);
  return 0;
}

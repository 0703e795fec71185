/* The CPU kernels of model._MatmulReluMaxPool: ReLU of a max-pool over all of a small convolution
 * output's positions (plus a per-channel bias), and the weight and bias gradients, which only the
 * winning positions receive. In PyTorch they are a max-pool, an add, a clamp, then a ReLU mask, a
 * zero fill, a scatter and a dense matmul of which 1 - 1 / positions of the terms are zeros. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* The gradients of the weight and bias of relu(max_p (windows @ weight^T)[i][p][c] + bias[c]) from the
 * output's gradient grad (n x channels), the output best and the winners where (max_pool_relu's):
 * grad_weight[c] = sum_i g[i][c] windows[i][where[i][c]], grad_bias[c] = sum_i g[i][c], with
 * g = grad where best > 0, else 0 (NaN where best is NaN). windows: n x positions x features,
 * grad_weight: channels x features. Only the winning window of each output gets a gradient: 1 /
 * positions of the dense product windows^T @ (gradient scattered to the positions). The sums run
 * per thread in a fixed split, then in thread order: the same result for the same thread count.
 * Returns 0, or -1 when out of memory. */
int max_pool_relu_backward(int64_t n, int64_t positions, int64_t channels, int64_t features,
                           const float *windows, const float *grad, const float *best, const uint8_t *where,
                           float *grad_weight, float *grad_bias) {
  const int64_t size = channels * (features + 1); /* one thread's grad_weight, then grad_bias */
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  float *partial = calloc(threads * size, sizeof(float));
  if (!partial) return -1;
#pragma omp parallel num_threads(threads)
  {
    int thread = 0;
#ifdef _OPENMP
    thread = omp_get_thread_num();
#endif
    float *restrict gw = partial + thread * size, *restrict gb = gw + channels * features;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < channels; ++c) {
        const float b = best[i * channels + c];
        const float g = b > 0 ? grad[i * channels + c] : b; /* b is 0 or NaN where the ReLU cut */
        if (g == 0) continue;
        const float *restrict row = windows + (i * positions + where[i * channels + c]) * features;
        float *restrict out = gw + c * features;
        for (int64_t k = 0; k < features; ++k) out[k] += g * row[k];
        gb[c] += g;
      }
  }
  for (int64_t j = 0; j < size; ++j) {
    float sum = 0;
    for (int t = 0; t < threads; ++t) sum += partial[t * size + j];
    if (j < channels * features) grad_weight[j] = sum;
    else grad_bias[j - channels * features] = sum;
  }
  free(partial);
  return 0;
}

/* The CPU kernels of model._MatmulReluMaxPool: ReLU of a max-pool over all of a small convolution
 * output's positions (plus a per-channel bias), and its backward pass's scatter of the gradient to
 * the winning positions. In PyTorch they are a max-pool, an add, a clamp, then a zero fill and a
 * scatter: each a trip through the 4x larger convolution output or a slow indexed kernel. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* x: n x positions x channels (contiguous). best[i][c] = relu(max_p x[i][p][c] + bias[c]); where[i][c]
 * = the first p holding the max (a NaN wins and stays NaN, as in max_pool2d and clamp_min). */
void max_pool_relu(int64_t n, int64_t positions, int64_t channels, const float *x, const float *bias,
                   float *best, uint8_t *where) {
#pragma omp parallel
  {
    float *m = malloc(channels * sizeof(float)); /* per thread: the max and its position so far */
    int32_t *at = malloc(channels * sizeof(int32_t));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
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
}

/* grad, where: n x channels; out: n x positions x channels, grad[i][c] at p = where[i][c], else 0. */
void max_pool_relu_backward(int64_t n, int64_t positions, int64_t channels, const float *grad,
                            const uint8_t *where, float *out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float *restrict gi = grad + i * channels;
    const uint8_t *restrict wi = where + i * channels;
    float *restrict oi = out + i * positions * channels;
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t c = 0; c < channels; ++c) oi[p * channels + c] = wi[c] == p ? gi[c] : 0;
  }
}

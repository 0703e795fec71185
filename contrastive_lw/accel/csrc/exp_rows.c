/* The CPU kernel of contrastive_lw.losses._SymmetricNTXent's forward: x <- exp(x - shift) in place over a square
 * similarity matrix, its diagonal set to 0, and each row's sum, in one pass. In PyTorch these are a
 * subtraction, an exponential, a diagonal write and a sum, each a trip through the matrix.
 *
 * The exponential is Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial,
 * the power of two written into the exponent bits): within 3 ulp of the exact value for arguments
 * in [-87.3, 88.3], the range of normal results; below it 0 (no subnormals), above it infinity,
 * NaN stays NaN. The loss only takes arguments in [-2 / temperature, 0]. */
#include <stdint.h>
#include <string.h>

static inline float exp_cephes(float x) {
  const float low = -87.33654475f, high = 88.37626266f;
  const int below = x < low, above = x > high;
  x = below ? low : above ? high : x; /* NaN passes through (the comparisons are false) */
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* x - n ln 2, ln 2 in two parts */
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  /* 2^n as two halves, so that n = 128 (x near high) does not overflow the exponent field */
  const int32_t half = (int32_t)n >> 1;
  const int32_t bits_a = (half + 127) << 23, bits_b = ((int32_t)n - half + 127) << 23;
  float scale_a, scale_b;
  memcpy(&scale_a, &bits_a, sizeof scale_a);
  memcpy(&scale_b, &bits_b, sizeof scale_b);
  const float result = p * scale_a * scale_b;
  return below ? 0.0f : above ? __builtin_inff() : result;
}

/* x: n x n (rows `stride` floats apart); sums[i] receives row i's sum after the exponential. */
void exp_row_sums(int64_t n, int64_t stride, float *x, float shift, float *sums) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float *restrict row = x + i * stride;
    for (int64_t j = 0; j < n; ++j) row[j] = exp_cephes(row[j] - shift);
    row[i] = 0.0f;
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += row[j];
    sums[i] = sum;
  }
}

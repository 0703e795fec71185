/* The CPU kernels of model._MatmulReluMaxPool: ReLU of a max-pool over all of a small convolution
 * output's positions (plus a per-channel bias), and the weight and bias gradients, which only the
 * winning positions receive, read straight from the block's input. In PyTorch they are a max-pool,
 * an add, a clamp, then a ReLU mask, a zero fill, a scatter and a dense matmul of the input's
 * windows (an im2col copy) of which 1 - 1 / positions of the terms are zeros. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The convolution output in rows planes (one per output row r), each n x cols x channels
 * (contiguous), row_stride floats apart: position p = r * cols + c of patch i is at x + r * row_stride
 * + (i * cols + c) * channels. best[i][k] = relu(max_p x[i][p][k] + bias[k]); where[i][k] = the
 * first p holding the max (a NaN wins and stays NaN, as in max_pool2d and clamp_min). */
void max_pool_relu(int64_t n, int64_t rows, int64_t cols, int64_t channels, const float *restrict x,
                  int64_t row_stride, const float *restrict bias, float *restrict best, uint8_t *restrict where) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float *restrict xi = x + i * cols * channels;
    float *restrict m = best + i * channels; /* the max so far, and where */
    uint8_t *restrict at = where + i * channels;
    for (int64_t c = 0; c < channels; ++c) m[c] = xi[c], at[c] = 0;
    for (int64_t p = 1; p < rows * cols; ++p) { /* channels innermost: vectorised */
      const float *restrict xp = xi + p / cols * row_stride + p % cols * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const float v = xp[c];
        const int wins = (v > m[c]) | (isnan(v) & !isnan(m[c]));
        m[c] = wins ? v : m[c];
        at[c] = wins ? (uint8_t)p : at[c];
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      const float y = m[c] + bias[c];
      m[c] = y <= 0 ? 0 : y; /* NaN <= 0 is false: NaN stays NaN */
    }
  }
}

/* The backward adds the terms of PATCHES patches per pass over a gradient row (each load and store
 * of the row serves PATCHES multiply-adds), in vectors of LANES floats: one register of the CPU's
 * widest (AVX-512: 16; else 8, AVX2's, for which GCC split 16-float vectors into pairs and spilled
 * the group's gradients to the stack, the kernel 3x slower). */
#define PATCHES 8
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));

static inline vec load(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* sums (one thread's gw, tails, gb) += the terms of a group of PATCHES patches: for each channel c,
 * g[j][c] times patch j's row of c's winning window (features floats from the patch's start plus
 * offset[p]), and g[j][c]. Columns past a row's last whole vector come from one vector ending at the
 * row's end, overlapping the one before it: they are summed apart, in tails (LANES a channel). */
static void add_group(int64_t channels, int64_t features, const float *const *patch, const uint8_t *const *winner,
                      const int64_t *offset, const float *restrict g, float *restrict sums) {
  float *restrict tails = sums + channels * features, *restrict gb = tails + channels * LANES;
  for (int64_t c = 0; c < channels; ++c) {
    const float *row[PATCHES];
    float gc[PATCHES];
    for (int j = 0; j < PATCHES; ++j) {
      row[j] = patch[j] + offset[winner[j][c]], gc[j] = g[j * channels + c];
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

/* The gradients of the weight and bias of relu(max_p conv(x)[i][p][c] + bias[c]) from the output's
 * gradient grad (n x channels), the output best and the winners where (max_pool_relu's, p = r * cols
 * + c for cols output columns): grad_weight[c] = sum_i g[i][c] window(i, where[i][c]), grad_bias[c] =
 * sum_i g[i][c], with g = grad where best > 0, else 0 (NaN where best is NaN). The window of output
 * (r, c) is read from x as one row of features floats starting at x + i * patch_stride + r * row_step
 * + c * col_step (for a k x k kernel on channels_last patches: its k rows of k pixels with the pixels
 * between them, whose columns the caller drops); grad_weight: channels x features. Only the winning
 * window of each output gets a gradient: 1 / positions of the dense product windows^T @ (gradient
 * scattered to the positions), and patches with no gradient at all (a triplet within its margin)
 * add nothing. The sums run per thread in a fixed split, then in thread order: the same result for
 * the same thread count. Returns 0, or -1 when out of memory or past 256 positions. */
int max_pool_relu_backward(int64_t n, int64_t positions, int64_t cols, int64_t channels, int64_t features,
                           const float *x, int64_t patch_stride, int64_t row_step, int64_t col_step,
                           const float *grad, const float *best, const uint8_t *where, float *grad_weight,
                           float *grad_bias) {
  /* the columns summed in gw; the rest are in tails */
  const int64_t whole = features >= LANES ? features / LANES * LANES : features;
  const int64_t size = channels * (features + LANES + 1); /* one thread's gw, tails, gb */
  int64_t offset[256];
  if (positions > 256) return -1;
  for (int64_t p = 0; p < positions; ++p) offset[p] = p / cols * row_step + p % cols * col_step;
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
    const float *patch[PATCHES]; /* the group's patches: their input, winners and gradients g */
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
      patch[filled] = x + i * patch_stride, winner[filled] = where + i * channels;
      if (++filled == PATCHES) {
        add_group(channels, features, patch, winner, offset, g, sums);
        filled = 0;
      }
    }
    if (filled) {
      for (int j = filled; j < PATCHES; ++j) { /* padding: the first patch again, with no gradient */
        patch[j] = patch[0], winner[j] = winner[0];
        for (int64_t c = 0; c < channels; ++c) g[j * channels + c] = 0;
      }
      add_group(channels, features, patch, winner, offset, g, sums);
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

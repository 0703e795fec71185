/* The CPU kernel of augment.Augmentation.cut: cut patches from uint8 images and augment them in
 * one pass. From the uniform draws of each patch it computes the same parameters as the Python
 * code (Augmentation._theta, Augmentation._colour_matrix), then applies a random resized crop and
 * rotation as a bilinear warp with borders replicated (grid_sample's bilinear / border /
 * align_corners=False on the cut patch), a 3 x 3 colour matrix, the contrast offset and a clamp
 * to [0, 1]. Each step is a loop over the pixels of one patch, which the compiler vectorises. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "packs pixels with little-endian reads; the PyTorch path serves big-endian machines"
#endif

/* patches: their rows are far apart in memory, fetch them early; into L2 (prefetcht2), as
 * prefetches into L1 stall when its few line-fill buffers are taken (both ends of each row) */
#define PREFETCH_AHEAD 4

/* settings: what AugmentConfig fixes, in this order, then the 4 x 9 colour basis */
enum { CROP_LO, CROP_HI, ROTATION_MAX, ROTATION_P, JITTER, HUE_MAX, JITTER_P, GRAYSCALE_P, BASIS };

/* Source x = t0 u + t2 v + t4, y = t1 u + t3 v + t5 of output u, v in [-1, 1]: a resized crop
 * (area, log aspect ratio, centre) composed with a rotation (angle, whether to rotate). */
static void crop_and_rotation(const float *uniform, int64_t stride, const float *settings, float *t) {
  const float area = uniform[0] * (settings[CROP_HI] - settings[CROP_LO]) + settings[CROP_LO];
  const float ratio = expf(uniform[stride] * logf(16.0f / 9) + logf(3.0f / 4));
  float width = sqrtf(area * ratio), height = sqrtf(area / ratio);
  if (!(width <= 1 && height <= 1)) width = height = 1; /* the whole patch, as torchvision falls back to */
  const float rotate = uniform[5 * stride] < settings[ROTATION_P];
  const float angle = (uniform[4 * stride] * 2 - 1) * rotate * settings[ROTATION_MAX];
  const float cos_a = cosf(angle), sin_a = sinf(angle);
  t[0] = width * cos_a, t[1] = width * sin_a, t[2] = -height * sin_a, t[3] = height * cos_a;
  t[4] = (uniform[2 * stride] * 2 - 1) * (1 - width), t[5] = (uniform[3 * stride] * 2 - 1) * (1 - height);
}

/* Colour matrix m (3 x 3) and contrast coefficient (offset = it x the mean gray level) of
 * brightness, contrast, saturation, hue (if jittered) and grayscale. */
static float colour_matrix(const float *uniform, int64_t stride, const float *settings, float *m) {
  const int on = uniform[0] < settings[JITTER_P];
  const float jitter = settings[JITTER];
  float factor[3];
  for (int k = 0; k < 3; ++k) factor[k] = on ? uniform[(1 + k) * stride] * (2 * jitter) + (1 - jitter) : 1;
  const float turn = (uniform[4 * stride] * 2 - 1) * on * settings[HUE_MAX];
  const float saturation = factor[2] * (uniform[5 * stride] >= settings[GRAYSCALE_P]);
  const float scale = factor[0] * factor[1];
  const float weight[4] = {saturation * scale, saturation * cosf(turn) * scale, saturation * sinf(turn) * scale,
                           (1 - saturation) * scale};
  for (int k = 0; k < 9; ++k) {
    float sum = 0;
    for (int w = 0; w < 4; ++w) sum += weight[w] * settings[BASIS + 9 * w + k];
    m[k] = sum;
  }
  return (1 - factor[1]) * factor[0];
}

/* Bilinear taps of each output pixel in the cut patch (size + 1 pixels a row, the last row and
 * column repeated): the index of the upper-left source pixel and the weights of the right and
 * lower ones. */
static void taps(int64_t n, int32_t size, const float *restrict u, const float *restrict v, const float *t,
                 int32_t *restrict at, float *restrict wx, float *restrict wy) {
  /* grid coordinate g in [-1, 1] -> source pixel (g + 1) size / 2 - 1/2, clipped to the patch */
  const float half = 0.5f * size, last = (float)(size - 1);
  const float ax = t[0] * half, bx = t[2] * half, cx = (t[4] + 1) * half - 0.5f;
  const float ay = t[1] * half, by = t[3] * half, cy = (t[5] + 1) * half - 0.5f;
  for (int64_t p = 0; p < n; ++p) {
    const float x = fminf(fmaxf(ax * u[p] + bx * v[p] + cx, 0), last);
    const float y = fminf(fmaxf(ay * u[p] + by * v[p] + cy, 0), last);
    const int32_t x0 = (int32_t)x, y0 = (int32_t)y;
    wx[p] = x - x0, wy[p] = y - y0;
    at[p] = y0 * (size + 1) + x0;
  }
}

/* Channel k (its byte of each packed source pixel) of the bilinear interpolation, in [0, 1]. */
#define CHANNEL(k) (((up_##k) + y * ((low_##k) - (up_##k))) * (1.0f / 255))
#define BYTE(word, k) ((float)(((word) >> (8 * (k))) & 255))
#define ROW(k, left, right) (BYTE(left, k) + x * (BYTE(right, k) - BYTE(left, k)))

/* Warp of a patch whose pixels are packed 4 channels to a word: one gather per tap for all of
 * them; plane k of dst (n values each) is channel k, for the first 3 or all 4 (planes: a constant
 * where it is inlined, so that the three-channel loop does no work for a fourth). */
static inline __attribute__((always_inline)) void interpolate(
    int planes, int64_t n, const uint32_t *restrict src, int64_t below, const int32_t *restrict at,
    const float *restrict wx, const float *restrict wy, float *restrict dst) {
  for (int64_t p = 0; p < n; ++p) {
    const uint32_t a = src[at[p]], b = src[at[p] + 1], c = src[at[p] + below], d = src[at[p] + below + 1];
    const float x = wx[p], y = wy[p];
    const float up_0 = ROW(0, a, b), up_1 = ROW(1, a, b), up_2 = ROW(2, a, b);
    const float low_0 = ROW(0, c, d), low_1 = ROW(1, c, d), low_2 = ROW(2, c, d);
    dst[p] = CHANNEL(0), dst[n + p] = CHANNEL(1), dst[2 * n + p] = CHANNEL(2);
    if (planes == 4) {
      const float up_3 = ROW(3, a, b), low_3 = ROW(3, c, d);
      dst[3 * n + p] = CHANNEL(3);
    }
  }
}

/* dst = clamp(m rgb + contrast x mean gray, 0, 1), from planes to interleaved RGB. */
static void apply_colour(int64_t n, const float *restrict red, const float *restrict green,
                         const float *restrict blue, const float *m, float contrast, float *restrict dst) {
  float gray = 0;
  for (int64_t p = 0; p < n; ++p) gray += 0.299f * red[p] + 0.587f * green[p] + 0.114f * blue[p];
  const float offset = contrast * gray / n;
  for (int64_t p = 0; p < n; ++p) {
    dst[3 * p] = fminf(fmaxf(m[0] * red[p] + m[1] * green[p] + m[2] * blue[p] + offset, 0), 1);
    dst[3 * p + 1] = fminf(fmaxf(m[3] * red[p] + m[4] * green[p] + m[5] * blue[p] + offset, 0), 1);
    dst[3 * p + 2] = fminf(fmaxf(m[6] * red[p] + m[7] * green[p] + m[8] * blue[p] + offset, 0), 1);
  }
}

/* images: N x H x W x C uint8 (a channels_last batch's memory, C <= 4); image, top, left: B patch
 * positions; geometry, colour: 6 x B uniform draws each, or NULL to skip that step (colour needs
 * C = 3); settings: see the enum above; out: B x size x size x C float. Returns 0, or -1 when
 * out of memory. */
int cut_and_augment(const uint8_t *restrict images, int64_t height, int64_t width, int64_t channels,
                    const int64_t *restrict image, const int64_t *restrict top, const int64_t *restrict left,
                    int64_t batch, int64_t size, const float *restrict geometry, const float *restrict colour,
                    const float *restrict settings, int threads, float *restrict out) {
  const int64_t image_row = width * channels, n = size * size, row = size * channels, src_row = size + 1;
  const uint32_t mask = channels == 4 ? 0xFFFFFFFFu : (1u << (8 * channels)) - 1;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    /* per thread: u, v, wx, wy, the warped patch (4 planes), the taps, the cut patch (packed) */
    float *scratch = malloc(sizeof(float) * n * 8 + sizeof(int32_t) * n + sizeof(uint32_t) * src_row * src_row);
    float *u = scratch, *v = u + n, *wx = v + n, *wy = wx + n, *warped = wy + n;
    int32_t *at = (int32_t *)(warped + 4 * n);
    uint32_t *src = (uint32_t *)(at + n);
    if (scratch) {
      for (int64_t p = 0; p < n; ++p) { /* output pixel centres in [-1, 1] */
        u[p] = (2 * (p % size) + 1) / (float)size - 1;
        v[p] = (2 * (p / size) + 1) / (float)size - 1;
      }
    } else {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      if (!scratch) continue;
      if (b + PREFETCH_AHEAD < batch) {
        const int64_t a = b + PREFETCH_AHEAD;
        const uint8_t *ahead = images + ((image[a] * height + top[a]) * width + left[a]) * channels;
        for (int64_t i = 0; i < size; ++i) { /* both ends of each row (it may cross a cache line), into L2 */
          __builtin_prefetch(ahead + i * image_row, 0, 1);
          __builtin_prefetch(ahead + i * image_row + row - 1, 0, 1);
        }
      }
      /* the cut patch, a pixel's channels packed in one word, its last column and row repeated
       * once (the taps of weight 0 read them) */
      const uint8_t *patch = images + ((image[b] * height + top[b]) * width + left[b]) * channels;
      for (int64_t i = 0; i < size; ++i) {
        const uint8_t *pixel = patch + i * image_row;
        uint32_t *dst_row = src + i * src_row;
        for (int64_t j = 0; j < size; ++j, pixel += channels) {
          if (j * channels + 4 <= row) { /* one 4-byte read, inside the patch row (little-endian) */
            memcpy(dst_row + j, pixel, 4);
            dst_row[j] &= mask;
          } else {
            dst_row[j] = 0;
            for (int64_t c = 0; c < channels; ++c) dst_row[j] |= (uint32_t)pixel[c] << (8 * c);
          }
        }
        dst_row[size] = dst_row[size - 1];
      }
      memcpy(src + size * src_row, src + (size - 1) * src_row, sizeof(uint32_t) * src_row);
      float t[6] = {1, 0, 0, 1, 0, 0};
      if (geometry) crop_and_rotation(geometry + b, batch, settings, t);
      taps(n, (int32_t)size, u, v, t, at, wx, wy);
      if (channels == 4)
        interpolate(4, n, src, src_row, at, wx, wy, warped);
      else
        interpolate(3, n, src, src_row, at, wx, wy, warped);
      float *dst = out + b * n * channels;
      if (colour) {
        float m[9];
        const float contrast = colour_matrix(colour + b, batch, settings, m);
        apply_colour(n, warped, warped + n, warped + 2 * n, m, contrast, dst);
      } else {
        for (int64_t p = 0; p < n; ++p)
          for (int64_t c = 0; c < channels; ++c) dst[p * channels + c] = warped[c * n + p];
      }
    }
    free(scratch);
  }
  return failed ? -1 : 0;
}

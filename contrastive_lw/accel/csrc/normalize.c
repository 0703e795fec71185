/* The CPU kernel of model.LayerwiseNet.normalize: (x - mean) / std per channel of float or uint8
 * (/ 255 first) images in any layout, written channels_last, in one pass. In PyTorch it is a
 * subtraction, a division and a layout copy, each a trip through memory (and per-channel
 * arithmetic on channels_last input is slower still); the same float32 operations in the same
 * order give the same values. */
#include <stdint.h>
#include <stdlib.h>

/* Images n x channels x height x width at element strides stride[0..3] of x (float32, or uint8 where
 * as_uint8), out: n x height x width x channels (contiguous). Returns 0, or -1 when out of memory. */
int normalize(int64_t n, int64_t channels, int64_t height, int64_t width, const int64_t *stride,
              const void *x, int as_uint8, const float *mean, const float *std, float *out) {
  const int64_t sn = stride[0], sc = stride[1], sh = stride[2], sw = stride[3];
  const int64_t size = height * width * channels;
  /* an image's pixels at one stride (NCHW or NHWC) are gathered as one row: long inner loops */
  const int64_t rows = sh == width * sw ? 1 : height, columns = sh == width * sw ? height * width : width;
  const uint8_t *bytes = x;
  const float *floats = x;
  int failed = 0;
#pragma omp parallel
  {
    /* per thread: mean and std repeated over a channels_last image, so that the arithmetic runs on
     * whole images (vectorised) after a plain gather of the image into place */
    float *image_mean = malloc(size * sizeof(float)), *image_std = malloc(size * sizeof(float));
    if (image_mean && image_std) {
      for (int64_t j = 0; j < size; ++j) image_mean[j] = mean[j % channels], image_std[j] = std[j % channels];
    } else {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (!image_mean || !image_std) continue;
      float *restrict o = out + i * size;
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t h = 0; h < rows; ++h)
          for (int64_t w = 0; w < columns; ++w) {
            const int64_t at = i * sn + c * sc + h * sh + w * sw;
            o[(h * columns + w) * channels + c] = as_uint8 ? (float)bytes[at] : floats[at];
          }
      if (as_uint8)
        for (int64_t j = 0; j < size; ++j) o[j] /= 255.0f; /* as x.float().div_(255) */
      for (int64_t j = 0; j < size; ++j) o[j] = (o[j] - image_mean[j]) / image_std[j];
    }
    free(image_mean);
    free(image_std);
  }
  return failed ? -1 : 0;
}

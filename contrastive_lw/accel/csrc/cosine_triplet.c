/* The CPU kernel of losses.TripletLoss with the cosine distance and no mining: the loss
 * mean_i relu(d(a_i, p_i) - d(a_i, n_i) + margin), d(x, y) = 1 - x.y / (max(|x|, eps) max(|y|, eps)),
 * and its gradient with respect to a, p and n, in one pass over the rows. In PyTorch the same
 * loss is ~30 element-wise ops forward and backward, each a trip through memory. */
#include <math.h>
#include <stdint.h>

#define EPS 1e-8f /* losses.paired_distance's clamp of the norms */

static float dot(const float *restrict x, const float *restrict y, int64_t n) {
  float sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * y[k];
  return sum;
}

/* Rows a, p, n (batch x dim, contiguous); hinge[i] receives row i's relu term. Where grad_a is
 * not NULL, grad_a, grad_p and grad_n receive the gradient of the mean loss (d loss / d row). */
void cosine_triplet(int64_t batch, int64_t dim, const float *a, const float *p, const float *n, float margin,
                    float *hinge, float *grad_a, float *grad_p, float *grad_n) {
  const float g = 1.0f / (float)batch; /* d mean / d hinge */
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < batch; ++i) {
    const float *restrict ai = a + i * dim, *restrict pi = p + i * dim, *restrict ni = n + i * dim;
    const float na = sqrtf(dot(ai, ai, dim)), np = sqrtf(dot(pi, pi, dim)), nn = sqrtf(dot(ni, ni, dim));
    const float ca = fmaxf(na, EPS), cp = fmaxf(np, EPS), cn = fmaxf(nn, EPS);
    const float cos_p = dot(ai, pi, dim) / (ca * cp), cos_n = dot(ai, ni, dim) / (ca * cn);
    const float h = cos_n - cos_p + margin; /* d(a, p) - d(a, n) + margin */
    hinge[i] = h <= 0 ? 0 : h; /* NaN stays NaN: the trainer's check of the loss sees it */
    if (!grad_a) continue;
    float *restrict ga = grad_a + i * dim, *restrict gp = grad_p + i * dim, *restrict gn = grad_n + i * dim;
    if (!(h > 0)) {
      for (int64_t k = 0; k < dim; ++k) ga[k] = gp[k] = gn[k] = 0;
      continue;
    }
    /* d cos(x, y) / dx = y / (|x| |y|) - cos x / |x|^2 (the second term is 0 where |x| < eps) */
    const float sa = na >= EPS ? g * (cos_p - cos_n) / (ca * ca) : 0;
    const float sp = np >= EPS ? g * cos_p / (cp * cp) : 0, sn = nn >= EPS ? g * cos_n / (cn * cn) : 0;
    const float wp = g / (ca * cp), wn = g / (ca * cn);
    for (int64_t k = 0; k < dim; ++k) {
      ga[k] = wn * ni[k] - wp * pi[k] + sa * ai[k];
      gp[k] = sp * pi[k] - wp * ai[k];
      gn[k] = wn * ai[k] - sn * ni[k];
    }
  }
}

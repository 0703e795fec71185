/* The CPU kernel of augment.Augmentation's draws: uniform floats in [0, 1) from a counter-based
 * generator (the splitmix64 mix of seed + the draw's index), so any draw can be computed apart
 * from the others: in parallel, vectorised. torch.rand on the CPU is one Mersenne Twister stream,
 * drawn one number after another. */
#include <stdint.h>

/* out[j] = the top 24 bits of splitmix64(seed + (j + 1) * golden ratio), / 2^24, for j < count. */
void uniform(uint64_t seed, int64_t count, float *out) {
#pragma omp parallel for simd schedule(static)
  for (int64_t j = 0; j < count; ++j) {
    uint64_t z = seed + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    out[j] = (float)(z >> 40) * (1.0f / 16777216);
  }
}

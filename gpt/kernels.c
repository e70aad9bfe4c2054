/* Kettle's native CPU kernels (gpt/native.py builds this file with the machine's C compiler and
 * loads it with ctypes; nothing else links it).
 *
 * kettle_linear: nn.Linear's product for a few rows (a decoding step: one, a speculative round's
 * check or the service's batch: a few), on one thread. At batch 1 decoding is a matrix-vector
 * product for every weight matrix, bound by how fast the weights stream from memory: eight rows at a time, each with its own accumulator, one load of x
 * for eight rows, the eight sums reduced together. PyTorch's kernel (MKL's sgemv) reads the same
 * weights at 12-18 GB/s on this project's CPU, this at 23-34 (benchmarks/llama_cpp.py). */
#include <immintrin.h>

#if defined(__AVX512F__)
#define KETTLE_SIMD 512
static inline __m256 kettle_half_sum(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define KETTLE_SIMD 256
#else
#define KETTLE_SIMD 0
#endif

int kettle_simd(void) { return KETTLE_SIMD; }

#if KETTLE_SIMD
/* The sums of eight 8-wide accumulators, in order: [sum a[0], ..., sum a[7]]. */
static inline __m256 kettle_sum8(const __m256 *a) {
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}
#endif

/* Y = X W^T + b for k rows X [k, n], W row-major [m, n], Y [k, m]: eight rows of W at a time,
 * each multiplied by every row of X while it is in the cache, so that W streams from memory once
 * whatever k is. */
void kettle_linear(const float *W, const float *X, const float *b, float *Y, long m, long n, long k) {
    long o = 0;
#if KETTLE_SIMD
    for (; o + 8 <= m; o += 8) {
        const float *w = W + o * n;
        for (long row = 0; row < k; row++) {
            const float *x = X + row * n;
            __m256 a[8];
            long i = 0;
#if KETTLE_SIMD == 512
            __m512 z[8];
            for (int r = 0; r < 8; r++) z[r] = _mm512_setzero_ps();
            for (; i + 16 <= n; i += 16) {
                __m512 xv = _mm512_loadu_ps(x + i);
                for (int r = 0; r < 8; r++) z[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * n + i), xv, z[r]);
            }
            for (int r = 0; r < 8; r++) a[r] = kettle_half_sum(z[r]);
#else
            for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
#endif
            for (; i + 8 <= n; i += 8) {
                __m256 xv = _mm256_loadu_ps(x + i);
                for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * n + i), xv, a[r]);
            }
            float sums[8];
            _mm256_storeu_ps(sums, kettle_sum8(a));
            for (int r = 0; r < 8; r++) {
                for (long j = i; j < n; j++) sums[r] += w[r * n + j] * x[j];
                Y[row * m + o + r] = sums[r] + (b ? b[o + r] : 0.0f);
            }
        }
    }
#endif
    for (; o < m; o++) {
        const float *w = W + o * n;
        for (long row = 0; row < k; row++) {
            float s = 0.0f;
            for (long i = 0; i < n; i++) s += w[i] * X[row * n + i];
            Y[row * m + o] = s + (b ? b[o] : 0.0f);
        }
    }
}

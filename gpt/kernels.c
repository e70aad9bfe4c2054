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

#if KETTLE_SIMD
/* Eight rows of W (w, n wide) times one row x0, or two rows x0 and x1 (`two`: a constant where it
 * is inlined, so each case compiles to its own loop): each weight loaded once for both rows, so a
 * batch's step is bound by the multiplications, not the loads. */
static inline __attribute__((always_inline)) void kettle_rows8(
    const float *w, long n, const float *b, const float *x0, float *y0, const float *x1, float *y1, const int two) {
    __m256 a0[8], a1[8];
    long i = 0;
#if KETTLE_SIMD == 512
    __m512 z0[8], z1[8];
    for (int r = 0; r < 8; r++) z0[r] = z1[r] = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 v0 = _mm512_loadu_ps(x0 + i), v1 = two ? _mm512_loadu_ps(x1 + i) : v0;
        for (int r = 0; r < 8; r++) {
            __m512 wv = _mm512_loadu_ps(w + r * n + i);
            z0[r] = _mm512_fmadd_ps(wv, v0, z0[r]);
            if (two) z1[r] = _mm512_fmadd_ps(wv, v1, z1[r]);
        }
    }
    for (int r = 0; r < 8; r++) {
        a0[r] = kettle_half_sum(z0[r]);
        a1[r] = two ? kettle_half_sum(z1[r]) : a0[r];
    }
#else
    for (int r = 0; r < 8; r++) a0[r] = a1[r] = _mm256_setzero_ps();
#endif
    for (; i + 8 <= n; i += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = two ? _mm256_loadu_ps(x1 + i) : v0;
        for (int r = 0; r < 8; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * n + i);
            a0[r] = _mm256_fmadd_ps(wv, v0, a0[r]);
            if (two) a1[r] = _mm256_fmadd_ps(wv, v1, a1[r]);
        }
    }
    float s0[8], s1[8];
    _mm256_storeu_ps(s0, kettle_sum8(a0));
    if (two) _mm256_storeu_ps(s1, kettle_sum8(a1));
    for (int r = 0; r < 8; r++) {
        for (long j = i; j < n; j++) {
            s0[r] += w[r * n + j] * x0[j];
            if (two) s1[r] += w[r * n + j] * x1[j];
        }
        y0[r] = s0[r] + (b ? b[r] : 0.0f);
        if (two) y1[r] = s1[r] + (b ? b[r] : 0.0f);
    }
}
#endif

/* Y = X W^T + b for k rows X [k, n], W row-major [m, n], Y [k, m]: eight rows of W at a time,
 * multiplied by every row of X (two at a time) while they are in the cache, so that W streams
 * from memory once whatever k is. */
void kettle_linear(const float *W, const float *X, const float *b, float *Y, long m, long n, long k) {
    long o = 0;
#if KETTLE_SIMD
    for (; o + 8 <= m; o += 8) {
        const float *w = W + o * n, *bias = b ? b + o : 0;
        long row = 0;
        for (; row + 2 <= k; row += 2)
            kettle_rows8(w, n, bias, X + row * n, Y + row * m + o, X + (row + 1) * n, Y + (row + 1) * m + o, 1);
        if (row < k) kettle_rows8(w, n, bias, X + row * n, Y + row * m + o, 0, 0, 0);
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

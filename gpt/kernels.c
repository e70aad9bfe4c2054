/* Kettle's native CPU kernels (gpt/native.py builds this file with the machine's C compiler and
 * loads it with ctypes; nothing else links it).
 *
 * kettle_linear: nn.Linear's product for a few rows (a decoding step: one, a speculative round's
 * check or the service's batch: a few), on one thread. At batch 1 decoding is a matrix-vector
 * product for every weight matrix, bound by how fast the weights stream from memory: eight rows
 * at a time, each with its own accumulator, one load of x for eight rows, the eight sums reduced
 * together, the next eight rows prefetched while these are multiplied (one thread alone keeps too
 * few reads in flight: 6 -> 11 GB/s for int8 weights on this project's Xeon). PyTorch's kernel
 * (MKL's sgemv) reads the same weights at 12-18 GB/s on this project's EPYC, this at 23-34
 * (benchmarks/llama_cpp.py). */
#include <immintrin.h>
#include <math.h>

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

/* The weight at `at` as fp32: an fp32 weight as it is, an int8 one (q8) widened, unscaled. */
static inline __attribute__((always_inline)) float kettle_weight(const void *w, long at, const int q8) {
    return q8 ? (float)((const signed char *)w)[at] : ((const float *)w)[at];
}

#if KETTLE_SIMD

#if KETTLE_SIMD == 512
static inline __attribute__((always_inline)) __m512 kettle_load16(const void *w, long at, const int q8) {
    return q8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const signed char *)w + at))))
              : _mm512_loadu_ps((const float *)w + at);
}
#endif

static inline __attribute__((always_inline)) __m256 kettle_load8(const void *w, long at, const int q8) {
    return q8 ? _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const signed char *)w + at))))
              : _mm256_loadu_ps((const float *)w + at);
}

/* Eight rows of W (w, n wide; fp32, or int8 with `scale` per row when q8) times one row x0, or
 * two rows x0 and x1 (`two`; `two` and `q8` are constants where this is inlined, so each case
 * compiles to its own loop): each weight loaded once for both rows, so a batch's step is bound by
 * the multiplications, not the loads. The next eight rows are prefetched once a cache line. */
static inline __attribute__((always_inline)) void kettle_rows8(
    const void *w, const float *scale, long n, const float *b, const float *x0, float *y0, const float *x1, float *y1,
    const int two, const int q8) {
    const long line = q8 ? 64 : 16; /* weights a cache line holds */
    const char *next = (const char *)w + 8 * n * (q8 ? 1 : 4);
    __m256 a0[8], a1[8];
    long i = 0;
#if KETTLE_SIMD == 512
    __m512 z0[8], z1[8];
    for (int r = 0; r < 8; r++) z0[r] = z1[r] = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 v0 = _mm512_loadu_ps(x0 + i), v1 = two ? _mm512_loadu_ps(x1 + i) : v0;
        for (int r = 0; r < 8; r++) {
            if (!(i & (line - 1))) _mm_prefetch(next + (r * n + i) * (q8 ? 1 : 4), _MM_HINT_T0);
            __m512 wv = kettle_load16(w, r * n + i, q8);
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
            if (!(i & (line - 1))) _mm_prefetch(next + (r * n + i) * (q8 ? 1 : 4), _MM_HINT_T0);
            __m256 wv = kettle_load8(w, r * n + i, q8);
            a0[r] = _mm256_fmadd_ps(wv, v0, a0[r]);
            if (two) a1[r] = _mm256_fmadd_ps(wv, v1, a1[r]);
        }
    }
    float s0[8], s1[8];
    _mm256_storeu_ps(s0, kettle_sum8(a0));
    if (two) _mm256_storeu_ps(s1, kettle_sum8(a1));
    for (int r = 0; r < 8; r++) {
        for (long j = i; j < n; j++) {
            s0[r] += kettle_weight(w, r * n + j, q8) * x0[j];
            if (two) s1[r] += kettle_weight(w, r * n + j, q8) * x1[j];
        }
        y0[r] = s0[r] * (q8 ? scale[r] : 1.0f) + (b ? b[r] : 0.0f);
        if (two) y1[r] = s1[r] * (q8 ? scale[r] : 1.0f) + (b ? b[r] : 0.0f);
    }
}
#endif

/* Y = X W^T + b for k rows X [k, n], W row-major [m, n] (fp32, or int8 whose row o stands for
 * W[o] * scale[o] when q8), Y [k, m]: eight rows of W at a time, multiplied by every row of X (two
 * at a time) while they are in the cache, so that W streams from memory once whatever k is. */
static inline __attribute__((always_inline)) void kettle_product(
    const void *W, const float *scale, const float *X, const float *b, float *Y, long m, long n, long k, const int q8) {
    long o = 0;
#if KETTLE_SIMD
    for (; o + 8 <= m; o += 8) {
        const void *w = (const char *)W + o * n * (q8 ? 1 : 4);
        const float *bias = b ? b + o : 0, *sc = q8 ? scale + o : 0;
        long row = 0;
        for (; row + 2 <= k; row += 2)
            kettle_rows8(w, sc, n, bias, X + row * n, Y + row * m + o, X + (row + 1) * n, Y + (row + 1) * m + o, 1, q8);
        if (row < k) kettle_rows8(w, sc, n, bias, X + row * n, Y + row * m + o, 0, 0, 0, q8);
    }
#endif
    for (; o < m; o++) {
        for (long row = 0; row < k; row++) {
            float s = 0.0f;
            for (long i = 0; i < n; i++) s += kettle_weight(W, o * n + i, q8) * X[row * n + i];
            Y[row * m + o] = s * (q8 ? scale[o] : 1.0f) + (b ? b[o] : 0.0f);
        }
    }
}

void kettle_linear(const float *W, const float *X, const float *b, float *Y, long m, long n, long k) {
    kettle_product(W, 0, X, b, Y, m, n, k, 0);
}

/* kettle_linear_q8: the same product with int8 weights, one fp32 scale per row of W (gpt.quantize's
 * Int8Linear): a quarter of fp32's bytes stream from memory. Each weight is widened to fp32 in a
 * register and multiplied by the fp32 activations (weight-only int8: the activations keep their
 * precision), the row's scale applied once to its sum. */
void kettle_linear_q8(const signed char *W, const float *scale, const float *X, const float *b, float *Y, long m,
                      long n, long k) {
    kettle_product(W, scale, X, b, Y, m, n, k, 1);
}

/* A layer's product by whichever kernel its weights need: int8 where it has scales, else fp32. */
static void kettle_matmul(const void *W, const float *scale, const float *X, const float *b, float *Y, long m, long n,
                          long k) {
    if (scale)
        kettle_linear_q8((const signed char *)W, scale, X, b, Y, m, n, k);
    else
        kettle_linear((const float *)W, X, b, Y, m, n, k);
}

/* ---- kettle_step: a whole batch-1 decoding step of a GPT-2 model in one call -------------------
 * What gpt.model computes for one new token (embeddings, every block, the final norm, the output
 * head), with the keys and values written into and read from gpt.model's KVCache tensors
 * ([n_layer, rows, n_head, max_len, head_dim], row 0): at the starter's shape PyTorch's ops
 * and Python between them cost twice the arithmetic, here they cost one call. */

struct kettle_dims {
    long n_layer, n_embd, n_head, hidden, vocab, max_len, cache_layer_stride;
    float eps;
};

/* A layer's weights, in gpt.model's order; biases may be NULL. `scales` has the same layout: an int8
 * matrix's row scales at its weight's place, NULL for fp32 weights (and everywhere else). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, OUT_W, OUT_B, PER_LAYER };

#if KETTLE_SIMD

static void kettle_layer_norm(const float *x, const float *w, const float *b, float *out, long n, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (long i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

static float kettle_dot(const float *a, const float *b, long n) {
    long i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s[8], total = 0.0f;
    _mm256_storeu_ps(s, acc);
    for (int j = 0; j < 8; j++) total += s[j];
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* Adds `from` into `into` (the residual stream). */
static void kettle_add(float *into, const float *from, long n) {
    for (long i = 0; i < n; i++) into[i] += from[i];
}

#endif

/* logits [rows, vocab] after tokens[r] at positions[r], row r's keys and values in the cache's
 * row slots[r] (rows cache_row_stride floats apart); scratch holds rows * (6 * n_embd + hidden)
 * + max_len floats. Every row's products read each weight once (kettle_matmul). Rows are taken in
 * order, each writing its keys and values before it attends: several rows in one slot at
 * consecutive positions are a causal pass over them (a speculative round's check). Returns 0, or
 * -1 where the build has no SIMD (the caller checks kettle_simd first). */
int kettle_step(const struct kettle_dims *d, const void *const *weights, const float *const *scales, const float *wte,
                const float *wpe, const float *lnf_w, const float *lnf_b, const void *head, const float *head_scale,
                float *k_cache, float *v_cache,
                long cache_row_stride, const long *tokens, const long *positions, const long *slots, long rows,
                float *logits,
                float *scratch) {
#if KETTLE_SIMD
    const long C = d->n_embd, H = d->n_head, hd = C / H, F = d->hidden;
    float *x = scratch, *h = x + rows * C, *qkv = h + rows * C, *y = qkv + rows * 3 * C, *u = y + rows * C;
    float *att = u + rows * F;
    const float scale = 1.0f / sqrtf((float)hd);
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < C; i++) x[r * C + i] = wte[tokens[r] * C + i] + wpe[positions[r] * C + i];
    for (long l = 0; l < d->n_layer; l++) {
        const float *const *w = (const float *const *)weights + l * PER_LAYER;
        const float *const *sc = scales + l * PER_LAYER; /* int8 layers' row scales, or NULL */
        for (long r = 0; r < rows; r++) kettle_layer_norm(x + r * C, w[LN1_W], w[LN1_B], h + r * C, C, d->eps);
        kettle_matmul(w[ATTN_W], sc[ATTN_W], h, w[ATTN_B], qkv, 3 * C, C, rows);
        for (long r = 0; r < rows; r++) {
            const long pos = positions[r];
            float *K = k_cache + l * d->cache_layer_stride + slots[r] * cache_row_stride;
            float *V = v_cache + l * d->cache_layer_stride + slots[r] * cache_row_stride;
            const float *row_qkv = qkv + r * 3 * C;
            for (long head_i = 0; head_i < H; head_i++) {
                float *k = K + (head_i * d->max_len) * hd, *v = V + (head_i * d->max_len) * hd;
                const float *q = row_qkv + head_i * hd;
                for (long j = 0; j < hd; j++) {
                    k[pos * hd + j] = row_qkv[C + head_i * hd + j];
                    v[pos * hd + j] = row_qkv[2 * C + head_i * hd + j];
                }
                float top = -INFINITY, total = 0.0f;
                for (long t = 0; t <= pos; t++) {
                    att[t] = kettle_dot(q, k + t * hd, hd) * scale;
                    if (att[t] > top) top = att[t];
                }
                for (long t = 0; t <= pos; t++) total += (att[t] = expf(att[t] - top));
                float *out = y + r * C + head_i * hd;
                for (long j = 0; j < hd; j++) out[j] = 0.0f;
                for (long t = 0; t <= pos; t++) {
                    const float p = att[t] / total, *vt = v + t * hd;
                    for (long j = 0; j < hd; j++) out[j] += p * vt[j];
                }
            }
        }
        kettle_matmul(w[PROJ_W], sc[PROJ_W], y, w[PROJ_B], h, C, C, rows);
        kettle_add(x, h, rows * C);
        for (long r = 0; r < rows; r++) kettle_layer_norm(x + r * C, w[LN2_W], w[LN2_B], h + r * C, C, d->eps);
        kettle_matmul(w[FC_W], sc[FC_W], h, w[FC_B], u, F, C, rows);
        for (long i = 0; i < rows * F; i++) { /* GELU, tanh approximation (GPT-2's) */
            const float z = u[i];
            u[i] = 0.5f * z * (1.0f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
        }
        kettle_matmul(w[OUT_W], sc[OUT_W], u, w[OUT_B], h, C, F, rows);
        kettle_add(x, h, rows * C);
    }
    for (long r = 0; r < rows; r++) kettle_layer_norm(x + r * C, lnf_w, lnf_b, h + r * C, C, d->eps);
    kettle_matmul(head, head_scale, h, 0, logits, d->vocab, C, rows);
    return 0;
#else
    (void)d; (void)weights; (void)scales; (void)head_scale; (void)wte; (void)wpe; (void)lnf_w; (void)lnf_b; (void)head; (void)k_cache;
    (void)v_cache; (void)cache_row_stride; (void)tokens; (void)positions; (void)slots; (void)rows; (void)logits; (void)scratch;
    return -1;
#endif
}

/* Native CPU kernels for the fused Conv2d -> ReLU -> MaxPool2d(2, 2): stride 1, square kernel k <= 7, zero
 * padding, floor-mode pooling. The contract is the Triton kernels' (kernels/conv_relu_pool.py):
 *
 *   forward          x, weight, bias -> pooled output (N, Cout, HP, WP) and a uint8 code per pooled element:
 *                    bits 0-1 the winning 2x2 window position (dy * 2 + dx), bit 2 whether ReLU passes the
 *                    gradient (the winner is not <= 0). The full-size convolution output is never stored.
 *   backward_weight  grad_pooled, code, x -> grad_weight, grad_bias
 *   backward_input   grad_pooled, code, weight -> grad_input
 *
 * Numerics: products are accumulated in fp32 with the bias added in fp32; each pre-activation is rounded ONCE to
 * the output dtype, and ReLU and the max work on the rounded values (PyTorch's chain compares values rounded to
 * its dtype, so ties are decided the same way). The max takes the first maximum in row-major order, with
 * PyTorch's NaN rule (a position replaces the best when `v > best || isnan(v)`). ReLU's gradient is
 * threshold_backward's: zero where the output is <= 0, so a window that is all <= 0 gets no gradient. Built
 * without -ffast-math: these rules need IEEE comparisons.
 *
 * Every function is a pure function over buffers: element strides for every tensor (NCHW, channels-last or any
 * other layout), float32 or bfloat16 storage (the caller passes the dtype), fp32 accumulation, no global state.
 * Threads: the caller passes how many (torch.get_num_threads()); the parallel regions run on the OpenMP runtime
 * already in the process (torch's libgomp: the library is linked against libgomp.so.1, the soname torch's copy
 * carries, so the dynamic loader binds to it and no second thread pool appears). Results do not depend on the
 * scheduling: the forward and grad_input write disjoint outputs, and grad_weight sums per-thread partials in
 * thread order, so a run repeats bitwise for a given thread count.
 *
 * The same source is compiled once per instruction set (AVX-512, AVX2 + FMA, baseline); the loader picks the
 * build the CPU supports. The vector code uses GCC's vector extensions, which every target lowers to its own
 * registers (one zmm, two ymm or four xmm per 16 floats).
 */

#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FASTCNN_CPU_ABI 3

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
/* options: bit 0 lets bf16 calls use AVX512-BF16 dot products where the CPU has them (the caller clears it to run
 * the fp32-FMA path, e.g. to test it on such a CPU). Bit 1 says the weight and bias (and so grad_weight and
 * grad_bias) are float32 while the data is the call's dtype: the kernels round the weights to that dtype as they
 * pack them, and write the parameter gradients rounded to it, as autocast's casts of the parameters do. */
enum { OPTION_DOT_BF16 = 1, OPTION_FP32_PARAMS = 2 };

static inline int param_dtype(int options, int dtype) { return (options & OPTION_FP32_PARAMS) ? DTYPE_F32 : dtype; }

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16u __attribute__((vector_size(32), aligned(2)));
typedef uint8_t vb16u __attribute__((vector_size(16), aligned(1)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

#define CO_BLOCK 16 /* output channels per vector (forward, grad_weight) */
#define CI_BLOCK 8  /* input channels per vector (grad_input) */
#if defined(__AVX512F__)
#define TAP_BLOCK 12 /* weight taps summed in registers at a time (grad_weight) */
#define PW_BLOCK 4 /* pooled columns per register block: 16 accumulators of 32 zmm registers */
#else
#define TAP_BLOCK 6
#define PW_BLOCK 2 /* 8 accumulators: with 256-bit (or narrower) registers, 16 or more of 16 */
#endif

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    /* Round to nearest even, as torch's c10::BFloat16 does; NaN becomes the canonical quiet NaN 0x7FC0. */
    if (isnan(f)) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float load_as_f32(const void *p, int64_t i, int dtype) {
    return dtype == DTYPE_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* v as the dtype holds it, in fp32 */
static inline float rounded_to(float v, int dtype) { return dtype == DTYPE_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* Element i of a parameter stored as pdtype, rounded to the compute dtype. */
static inline float param_as(const void *p, int64_t i, int pdtype, int dtype) {
    return rounded_to(load_as_f32(p, i, pdtype), dtype);
}

static inline void store_from_f32(void *p, int64_t i, float v, int dtype) {
    if (dtype == DTYPE_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}


/* Lane-wise helpers. Comparisons of float vectors give 0 / -1 integer lanes; casts between vector types of one
 * size reinterpret the bits. */
static inline v16 select16(vi16 mask, v16 a, v16 b) { return (v16)(((vi16)a & mask) | ((vi16)b & ~mask)); }

/* The value the output dtype holds for an fp32 result (what PyTorch's chain compares): f32_to_bf16 and back. */
static inline v16 rounded16(v16 v, int dtype) {
    if (dtype != DTYPE_BF16) return v;
    const vu16 u = (vu16)v;
    const vu16 r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return select16(v != v, (v16)((vu16){0} + 0x7FC00000u), (v16)r);
}

static void *alloc_floats(int64_t n) {
    size_t bytes = (size_t)round_up(n > 0 ? n : 1, 16) * sizeof(float);
    return aligned_alloc(64, bytes);
}

/* Rows ih0 .. ih0 + rows - 1 of image n, every channel, as fp32 with the zero padding made explicit:
 * tile[(ci * rows + r) * (W + 2 * pad) + pad + iw] = x[n, ci, ih0 + r, iw], zero outside the image. */
static void load_rows(const void *x, const int64_t *xs, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
                      int64_t pad, int64_t ih0, int64_t rows, float *tile) {
    const int64_t tw = w + 2 * pad;
    for (int64_t ci = 0; ci < c_in; ci++) {
        for (int64_t r = 0; r < rows; r++) {
            float *dst = tile + (ci * rows + r) * tw;
            const int64_t ih = ih0 + r;
            if (ih < 0 || ih >= h) {
                memset(dst, 0, (size_t)tw * sizeof(float));
                continue;
            }
            for (int64_t i = 0; i < pad; i++) dst[i] = dst[pad + w + i] = 0.0f;
            const int64_t base = n * xs[0] + ci * xs[1] + ih * xs[2];
            if (dtype == DTYPE_F32 && xs[3] == 1) {
                memcpy(dst + pad, (const float *)x + base, (size_t)w * sizeof(float));
            } else if (dtype == DTYPE_BF16 && xs[3] == 1) {
                const uint16_t *src = (const uint16_t *)x + base;
                for (int64_t iw = 0; iw < w; iw++) dst[pad + iw] = bf16_to_f32(src[iw]);
            } else {
                for (int64_t iw = 0; iw < w; iw++) dst[pad + iw] = load_as_f32(x, base + iw * xs[3], dtype);
            }
        }
    }
}

/* weight (Cout, Cin, k, k) with strides ws -> fp32 packed[((ci * k + ky) * k + kx) * co_pad + co], zero-padded
 * to co_pad output channels, so that one vector load reads CO_BLOCK output channels of one tap. */
static void pack_weight_by_tap(const void *weight, const int64_t *ws, int pdtype, int dtype, int64_t c_out, int64_t c_in,
                               int64_t k, int64_t co_pad, float *packed) {
    memset(packed, 0, (size_t)(c_in * k * k * co_pad) * sizeof(float));
    for (int64_t co = 0; co < c_out; co++)
        for (int64_t ci = 0; ci < c_in; ci++)
            for (int64_t ky = 0; ky < k; ky++)
                for (int64_t kx = 0; kx < k; kx++)
                    packed[((ci * k + ky) * k + kx) * co_pad + co] =
                        param_as(weight, co * ws[0] + ci * ws[1] + ky * ws[2] + kx * ws[3], pdtype, dtype);
}

int fastcnn_cpu_abi(void) { return FASTCNN_CPU_ABI; }

const char *fastcnn_cpu_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__x86_64__)
    return "sse2";
#elif defined(__aarch64__)
    return "neon";
#else
    return "portable";
#endif
}

/* ------------------------------------------------------------------------------------------------- forward */

/* The epilogue of one pooled element (image n, pooled row ph and column pw) for the output channels of block b
 * (`valid` of them): the max over the window's four pre-activations acc[0..3] (dy * 2 + dx order), ReLU, the
 * stores of the pooled value and the code.
 *
 * PyTorch's chain takes ReLU first, then the first maximum in row-major order (NaN wins: a position replaces the
 * best when `v > best || isnan(v)`), on values rounded to the output dtype. Taking the maximum of the rounded
 * pre-activations first and ReLU once after gives the same value and the same code: where the maximum is > 0 (or
 * NaN) the same positions win, and where it is <= 0 every ReLU output is 0, so the first position wins, which is
 * code 0 with the pass bit clear (threshold_backward passes no gradient where the output is <= 0). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __m512 rounded512(__m512 v, int dtype) { /* rounded16 with mask registers */
    if (dtype != DTYPE_BF16) return v;
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                       _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}

static inline __attribute__((always_inline)) void pool_and_store(const v16 *acc, void *out, const int64_t *os,
                                                                 uint8_t *code, const int64_t *cs, int64_t n,
                                                                 int64_t ph, int64_t pw, int64_t b, int64_t valid,
                                                                 int dtype) {
    const __m512 a0 = (__m512)acc[0], a1 = (__m512)acc[1], a2 = (__m512)acc[2], a3 = (__m512)acc[3];
    __m512 best;
    __m512i idx;
    __mmask16 pass;
    if (!(_mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a2, a3, _CMP_UNORD_Q))) {
        /* No NaN (the common case): round only the maximum. Rounding is monotonic, so the rounded maximum R is the
         * maximum of the rounded values, and a position's rounded value equals R exactly when it is at least L,
         * the least fp32 value that rounds to R: the midpoint below R, or the next value up when R's last bf16
         * bit is odd (round-half-to-even sends the midpoint down then). The first such position wins. Only
         * windows with R > 0 need it (the others get code 0, see above), and there L > 0: negative values, -0
         * included, fall below it. */
        const __m512 m = _mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3));
        __m512 least = m;
        best = m;
        if (dtype == DTYPE_BF16) {
            const __m512i u = _mm512_castps_si512(m);
            const __m512i r = _mm512_and_si512(
                _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
                _mm512_set1_epi32((int)0xFFFF0000u));
            best = _mm512_castsi512_ps(r);
            least = _mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_sub_epi32(r, _mm512_set1_epi32(0x8000)),
                _mm512_and_si512(_mm512_srli_epi32(r, 16), _mm512_set1_epi32(1))));
        }
        pass = _mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_GT_OQ);
        idx = _mm512_set1_epi32(3);
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(a2, least, _CMP_GE_OQ), _mm512_set1_epi32(2));
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(a1, least, _CMP_GE_OQ), _mm512_set1_epi32(1));
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(a0, least, _CMP_GE_OQ), _mm512_setzero_si512());
    } else {
        /* A NaN somewhere in the block: every position rounded, PyTorch's rule position by position. */
        best = rounded512(a0, dtype);
        idx = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int d = 1; d < 4; d++) {
            const __m512 cand = rounded512((__m512)acc[d], dtype);
            const __mmask16 upd =
                _mm512_cmp_ps_mask(cand, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(cand, cand, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, upd, cand);
            idx = _mm512_mask_mov_epi32(idx, upd, _mm512_set1_epi32(d));
        }
        /* ReLU and the pass bit: not <= 0 (so NaN passes, as it does through threshold_backward) */
        pass = _mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_NLE_UQ);
    }
    best = _mm512_maskz_mov_ps(pass, best);
    const __m512i codes = _mm512_maskz_or_epi32(pass, idx, _mm512_set1_epi32(4));
    const __mmask16 lanes = (__mmask16)((1u << valid) - 1u);
    const int64_t o = n * os[0] + b * CO_BLOCK * os[1] + ph * os[2] + pw * os[3];
    const int64_t q = n * cs[0] + b * CO_BLOCK * cs[1] + ph * cs[2] + pw * cs[3];
    /* best is already rounded to the output dtype: bf16 is its top half, exactly. */
    const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(best), 16));
    const __m128i bytes = _mm512_cvtepi32_epi8(codes);
    if (os[1] == 1) { /* channels-last: one (masked) vector store */
        if (dtype == DTYPE_BF16)
            _mm256_mask_storeu_epi16((uint16_t *)out + o, lanes, half);
        else
            _mm512_mask_storeu_ps((float *)out + o, lanes, best);
    } else {
        uint16_t half_l[CO_BLOCK];
        float best_l[CO_BLOCK];
        _mm256_storeu_si256((__m256i *)half_l, half);
        _mm512_storeu_ps(best_l, best);
        if (dtype == DTYPE_BF16)
            for (int64_t c = 0; c < valid; c++) ((uint16_t *)out)[o + c * os[1]] = half_l[c];
        else
            for (int64_t c = 0; c < valid; c++) ((float *)out)[o + c * os[1]] = best_l[c];
    }
    if (cs[1] == 1) {
        _mm_mask_storeu_epi8(code + q, lanes, bytes);
    } else {
        uint8_t code_l[16];
        _mm_storeu_si128((__m128i *)code_l, bytes);
        for (int64_t c = 0; c < valid; c++) code[q + c * cs[1]] = code_l[c];
    }
}
#else
static inline __attribute__((always_inline)) void pool_and_store(const v16 *acc, void *out, const int64_t *os,
                                                                 uint8_t *code, const int64_t *cs, int64_t n,
                                                                 int64_t ph, int64_t pw, int64_t b, int64_t valid,
                                                                 int dtype) {
    const v16 zero = {0};
    v16 best = rounded16(acc[0], dtype);
    vi16 idx = {0};
    for (int d = 1; d < 4; d++) {
        const v16 cand = rounded16(acc[d], dtype);
        const vi16 upd = (cand > best) | (cand != cand);
        best = select16(upd, cand, best);
        idx = (upd & d) | (idx & ~upd);
    }
    const vi16 pass = ~(best <= zero);
    best = select16(pass, best, zero);
    const vi16 codes = pass & (idx | 4);
    uint32_t best_l[CO_BLOCK];
    int32_t code_l[CO_BLOCK];
    /* best is already rounded to the output dtype: bf16 is its top half, exactly. */
    const vu16 bits = dtype == DTYPE_BF16 ? (vu16)best >> 16 : (vu16)best;
    const int64_t o = n * os[0] + b * CO_BLOCK * os[1] + ph * os[2] + pw * os[3];
    const int64_t q = n * cs[0] + b * CO_BLOCK * cs[1] + ph * cs[2] + pw * cs[3];
    if (valid == CO_BLOCK && os[1] == 1 && cs[1] == 1) { /* channels-last: whole-vector stores */
        if (dtype == DTYPE_BF16)
            *(vh16u *)((uint16_t *)out + o) = __builtin_convertvector(bits, vh16u);
        else
            *(v16u *)((float *)out + o) = best;
        *(vb16u *)(code + q) = __builtin_convertvector(codes, vb16u);
        return;
    }
    memcpy(best_l, &bits, sizeof best_l);
    memcpy(code_l, &codes, sizeof code_l);
    if (dtype == DTYPE_BF16)
        for (int64_t c = 0; c < valid; c++) ((uint16_t *)out)[o + c * os[1]] = (uint16_t)best_l[c];
    else
        for (int64_t c = 0; c < valid; c++) ((uint32_t *)out)[o + c * os[1]] = best_l[c];
    for (int64_t c = 0; c < valid; c++) code[q + c * cs[1]] = (uint8_t)code_l[c];
}
#endif

/* Pooled columns pw .. pw + cols - 1 of pooled row ph, output channels b * CO_BLOCK ..: four accumulators (the
 * window positions) per column, sharing each weight vector across the columns. cols is a constant at each call
 * site, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void forward_columns(
    const int cols, const int k_const, const float *tile, const float *packed, const float *bias_f, void *out,
    const int64_t *os, uint8_t *code, const int64_t *cs, int64_t n, int64_t ph, int64_t pw, int64_t b, int64_t c_in,
    int64_t c_out, int64_t k, int64_t co_pad, int64_t rows, int64_t tw, int dtype) {
    if (k_const) k = k_const; /* a constant: the kx loop unrolls, each input a broadcast operand of its FMA */
    v16 acc[PW_BLOCK][4];
    const v16 bv = *(const v16u *)(bias_f + b * CO_BLOCK);
#pragma GCC unroll 8
    for (int j = 0; j < cols; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = bv;
    for (int64_t ci = 0; ci < c_in; ci++) {
        for (int64_t ky = 0; ky < k; ky++) {
            const float *r0 = tile + (ci * rows + ky) * tw + 2 * pw, *r1 = r0 + tw;
            const float *wt = packed + (ci * k + ky) * k * co_pad + b * CO_BLOCK;
#pragma GCC unroll 8
            for (int64_t kx = 0; kx < k; kx++) {
                const v16 wv = *(const v16u *)(wt + kx * co_pad);
#pragma GCC unroll 8
                for (int j = 0; j < cols; j++) {
                    acc[j][0] += r0[2 * j + kx] * wv;
                    acc[j][1] += r0[2 * j + kx + 1] * wv;
                    acc[j][2] += r1[2 * j + kx] * wv;
                    acc[j][3] += r1[2 * j + kx + 1] * wv;
                }
            }
        }
    }
    const int64_t valid = c_out - b * CO_BLOCK < CO_BLOCK ? c_out - b * CO_BLOCK : CO_BLOCK;
#pragma GCC unroll 8
    for (int j = 0; j < cols; j++)
        pool_and_store(acc[j], out, os, code, cs, n, ph, pw + j, b, valid, dtype);
}

/* Pooled row ph of image n, channel block b: PW_BLOCK columns at a time, then one by one. k_const is 3, 5 (the
 * tutorials' kernel sizes, specialized) or 0 (any k). */
static inline __attribute__((always_inline)) void forward_row(
    const int k_const, const float *tile, const float *packed, const float *bias_f, void *out, const int64_t *os,
    uint8_t *code, const int64_t *cs, int64_t n, int64_t ph, int64_t wp, int64_t b, int64_t c_in, int64_t c_out,
    int64_t k, int64_t co_pad, int64_t rows, int64_t tw, int dtype) {
    int64_t pw = 0;
    for (; pw + PW_BLOCK <= wp; pw += PW_BLOCK)
        forward_columns(PW_BLOCK, k_const, tile, packed, bias_f, out, os, code, cs, n, ph, pw, b, c_in, c_out, k,
                        co_pad, rows, tw, dtype);
    for (; pw < wp; pw++)
        forward_columns(1, k_const, tile, packed, bias_f, out, os, code, cs, n, ph, pw, b, c_in, c_out, k, co_pad,
                        rows, tw, dtype);
}

int fastcnn_cpu_forward(const void *x, const int64_t *xs, const void *weight, const int64_t *ws, const void *bias,
                        void *out, const int64_t *os, uint8_t *code, const int64_t *cs, int64_t n_batch,
                        int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t k, int64_t pad, int dtype,
                        int threads, int options) {
    const int pdtype = param_dtype(options, dtype);
    const int64_t hp = (h + 2 * pad - k + 1) / 2, wp = (w + 2 * pad - k + 1) / 2;
    if (n_batch <= 0 || hp <= 0 || wp <= 0) return 0;
    const int64_t co_pad = round_up(c_out, CO_BLOCK), blocks = co_pad / CO_BLOCK;
    const int64_t rows = k + 1, tw = w + 2 * pad, taps = c_in * k * k;
    float *packed = alloc_floats(taps * co_pad), *bias_f = alloc_floats(co_pad);
    if (!packed || !bias_f) {
        free(packed);
        free(bias_f);
        return -1;
    }
    pack_weight_by_tap(weight, ws, pdtype, dtype, c_out, c_in, k, co_pad, packed);
    for (int64_t co = 0; co < co_pad; co++) bias_f[co] = (bias && co < c_out) ? param_as(bias, co, pdtype, dtype) : 0.0f;
    int failed = 0;

#pragma omp parallel num_threads(threads)
    {
        float *tile = alloc_floats(c_in * rows * tw);
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        }
        /* One task per (image, pooled row): its k + 1 input rows are converted once and reused by every
         * pooled column and output channel. */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < n_batch * hp; task++) {
            if (!tile) continue;
            const int64_t n = task / hp, ph = task % hp;
            load_rows(x, xs, dtype, n, c_in, h, w, pad, 2 * ph - pad, rows, tile);
            /* Channel blocks outermost: one block's weights (taps x 64 bytes) stay in L1 across the row. */
            for (int64_t b = 0; b < blocks; b++) {
                if (k == 3)
                    forward_row(3, tile, packed, bias_f, out, os, code, cs, n, ph, wp, b, c_in, c_out, k, co_pad, rows,
                                tw, dtype);
                else if (k == 5)
                    forward_row(5, tile, packed, bias_f, out, os, code, cs, n, ph, wp, b, c_in, c_out, k, co_pad, rows,
                                tw, dtype);
                else
                    forward_row(0, tile, packed, bias_f, out, os, code, cs, n, ph, wp, b, c_in, c_out, k, co_pad, rows,
                                tw, dtype);
            }
        }
        free(tile);
    }
    free(packed);
    free(bias_f);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ grad_weight */

/* grad_w[co, ci, ky, kx] = sum over (n, ph, pw) of g_d[co] * x[n, ci, 2ph + dy + ky - pad, 2pw + dx + kx - pad]
 * summed over the window positions d = (dy, dx), where g_d[co] is grad_pooled where the code says position d won
 * and ReLU passes, else 0. Each thread sums its static share of (n, ph) rows into its own fp32 partials; the
 * partials are added in thread order. */
/* g_d for one pooled element and the output channels of one block (`valid` of them): grad_pooled where the code
 * says window position d won and ReLU passes, else 0, for d = 0..3 into gd[0..3]; their sum (grad_pooled where
 * ReLU passes) added to *bias_sum, which the caller keeps in a register across the row. Returns whether any channel passes. The code and the gradient are read
 * apart, each with vector loads where its channels are contiguous (channels-last) and lane by lane elsewhere. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* The codes of `valid` output channels (the block's lanes, zero past them): one masked load where the channels
 * are contiguous, lane by lane elsewhere. Both grad_weight paths read them this way. */
static inline __attribute__((always_inline)) __m128i codes16(const uint8_t *code, int64_t q, const int64_t *cs,
                                                             int64_t valid) {
    if (cs[1] == 1) return _mm_maskz_loadu_epi8((__mmask16)((1u << valid) - 1u), code + q);
    uint8_t code_l[16] = {0};
    for (int64_t c = 0; c < valid; c++) code_l[c] = code[q + c * cs[1]];
    return _mm_loadu_si128((const __m128i *)code_l);
}

static inline __attribute__((always_inline)) int window_grads(const void *grad, int64_t o, const int64_t *gs,
                                                              const uint8_t *code, int64_t q, const int64_t *cs,
                                                              int64_t valid, int dtype, v16 *gd, v16 *bias_sum) {
    const __mmask16 lanes = (__mmask16)((1u << valid) - 1u);
    const __m128i cd = codes16(code, q, cs, valid);
    /* A lane passes a gradient to position d exactly when its code is 4 + d. */
    const __mmask16 pass = _mm_test_epi8_mask(cd, _mm_set1_epi8(4));
    if (!pass) return 0;
    __m512 g;
    if (gs[1] == 1) {
        if (dtype == DTYPE_BF16)
            g = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)grad + o)), 16));
        else
            g = _mm512_maskz_loadu_ps(lanes, (const float *)grad + o);
    } else {
        float g_l[CO_BLOCK] = {0};
        for (int64_t c = 0; c < valid; c++) g_l[c] = load_as_f32(grad, o + c * gs[1], dtype);
        g = _mm512_loadu_ps(g_l);
    }
#pragma GCC unroll 4
    for (int d = 0; d < 4; d++)
        gd[d] = (v16)_mm512_maskz_mov_ps(_mm_cmpeq_epi8_mask(cd, _mm_set1_epi8((char)(4 + d))), g);
    *bias_sum = (v16)_mm512_mask_add_ps((__m512)*bias_sum, pass, (__m512)*bias_sum, g);
    return 1;
}
#else
static inline __attribute__((always_inline)) int window_grads(const void *grad, int64_t o, const int64_t *gs,
                                                              const uint8_t *code, int64_t q, const int64_t *cs,
                                                              int64_t valid, int dtype, v16 *gd, v16 *bias_sum) {
    vi16 cd;
    v16 g;
    if (valid == CO_BLOCK && cs[1] == 1) {
        cd = __builtin_convertvector(*(const vb16u *)(code + q), vi16);
    } else {
        int32_t code_l[CO_BLOCK] = {0};
        for (int64_t c = 0; c < valid; c++) code_l[c] = code[q + c * cs[1]];
        memcpy(&cd, code_l, sizeof cd);
    }
    if (valid == CO_BLOCK && gs[1] == 1) {
        if (dtype == DTYPE_BF16)
            g = (v16)(__builtin_convertvector(*(const vh16u *)((const uint16_t *)grad + o), vu16) << 16);
        else
            g = *(const v16u *)((const float *)grad + o);
    } else {
        float g_l[CO_BLOCK] = {0};
        for (int64_t c = 0; c < valid; c++) g_l[c] = load_as_f32(grad, o + c * gs[1], dtype);
        memcpy(&g, g_l, sizeof g);
    }
    uint64_t pass_bits[2];
    const vb16u pass_bytes = __builtin_convertvector(cd & 4, vb16u);
    memcpy(pass_bits, &pass_bytes, sizeof pass_bits);
    if (!(pass_bits[0] | pass_bits[1])) return 0;
    const v16 zero = {0};
    const vi16 pass = (cd & 4) != 0, win = cd & 3;
    gd[0] = select16(pass & (win == 0), g, zero);
    gd[1] = select16(pass & (win == 1), g, zero);
    gd[2] = select16(pass & (win == 2), g, zero);
    gd[3] = select16(pass & (win == 3), g, zero);
    *bias_sum += (gd[0] + gd[1]) + (gd[2] + gd[3]);
    return 1;
}
#endif

/* Every tap of a channel block, for both grad_weight paths: TAP_BLOCK taps at a time, summed over the row's
 * columns in registers and then added once, and the rest in a block of its own size rounded up to a multiple of 3
 * (k = 3 layers' taps), so that each call site's block size is a constant. CALL(size, used, t0) sums `used` taps
 * from tap t0 in a block of `size`. */
#define FOR_TAP_BLOCKS(taps, CALL)                                                                              \
    do {                                                                                                        \
        int64_t t0_ = 0;                                                                                        \
        for (; t0_ + TAP_BLOCK <= (taps); t0_ += TAP_BLOCK) CALL(TAP_BLOCK, TAP_BLOCK, t0_);                    \
        const int64_t rest_ = (taps) - t0_;                                                                     \
        if (rest_ > 9) CALL(TAP_BLOCK, rest_, t0_);                                                             \
        else if (rest_ > 6) CALL(9, rest_, t0_);                                                                \
        else if (rest_ > 3) CALL(6, rest_, t0_);                                                                \
        else if (rest_ > 0) CALL(3, rest_, t0_);                                                                \
    } while (0)

/* grad_w for `used` taps (of a block of `taps`, a constant at each call site, so the accumulators live in
 * registers) of one channel block: the sum over the row's live columns of the four window positions' inputs times
 * their g_d, added to the partial sums once. Taps past `used` compute on tap 0's input and are dropped. */
static inline __attribute__((always_inline)) void weight_grad_taps(
    const int taps, const int64_t used, const float *tile, const int64_t *tap_offset, const v16 *gbuf,
    const int64_t *columns, int64_t live, int64_t tw, float *acc_out, int64_t co_pad) {
    v16 acc[12], acc2[12]; /* the largest block size any call site passes */
    int64_t off[12];
#pragma GCC unroll 16
    for (int t = 0; t < taps; t++) {
        acc[t] = acc2[t] = (v16){0};
        off[t] = t < used ? tap_offset[t] : 0;
    }
    /* Two sums per tap (the window's top and bottom row), each a chain of fused multiply-adds: four FMAs per
     * tap and column, and chains short enough for the FMA units' latency. */
    for (int64_t i = 0; i < live; i++) {
        const v16 *gd = gbuf + 4 * i;
        const v16 g00 = gd[0], g01 = gd[1], g10 = gd[2], g11 = gd[3];
        const float *base = tile + columns[i];
#pragma GCC unroll 16
        for (int t = 0; t < taps; t++) {
            const float *r0 = base + off[t], *r1 = r0 + tw;
            acc[t] += r0[0] * g00;
            acc2[t] += r1[0] * g10;
            acc[t] += r0[1] * g01;
            acc2[t] += r1[1] * g11;
        }
    }
    for (int t = 0; t < taps && t < used; t++) *(v16u *)(acc_out + t * co_pad) += acc[t] + acc2[t];
}

/* ---- grad_weight with AVX512-BF16 dot products (bf16 data on a CPU that has them) ----
 * vdpbf16ps multiplies pairs of bf16 values and adds both products to an fp32 lane. The pairs here are the two
 * columns of a window row: the inputs x[.., c + kx] and x[.., c + kx + 1] are neighbours in a bf16 copy of the
 * rows (one 32-bit load), and the window positions dx = 0 and dx = 1 of their gradient make the other pair. So a
 * tap takes two instructions per column instead of four FMAs, on the same exact products (a bf16 times a bf16 is
 * exact in fp32), summed in another order. The instruction treats bf16 subnormals as zero. */
/* GCC 11 knows avx512bf16 in __builtin_cpu_supports; an older compiler builds the FMA path only */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__GNUC__) && __GNUC__ >= 11
#define HAVE_DOT_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512bf16")

/* grad_pooled of one pooled element as the two pairs (dx = 0, dx = 1) of each window row: pairs[0] for dy = 0,
 * pairs[1] for dy = 1, each lane (output channel) a bf16 pair; zero where the code says another position won or
 * ReLU passes nothing. Adds grad_pooled where ReLU passes to the bias partials; returns whether any lane passes. */
static inline __attribute__((always_inline)) int window_grad_pairs(const uint16_t *grad, int64_t o,
                                                                   const int64_t *gs, const uint8_t *code, int64_t q,
                                                                   const int64_t *cs, int64_t valid, __m512i *pairs,
                                                                   __m512 *bias_sum) {
    const __mmask16 lanes = (__mmask16)((1u << valid) - 1u);
    const __m128i cd = codes16(code, q, cs, valid);
    __m512i g;
    const __mmask16 pass = _mm_test_epi8_mask(cd, _mm_set1_epi8(4));
    if (!pass) return 0;
    if (gs[1] == 1) {
        g = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, grad + o));
    } else {
        uint16_t g_l[16] = {0};
        for (int64_t c = 0; c < valid; c++) g_l[c] = grad[o + c * gs[1]];
        g = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)g_l));
    }
    const __m512i high = _mm512_slli_epi32(g, 16); /* also grad_pooled as fp32 */
#pragma GCC unroll 2
    for (int dy = 0; dy < 2; dy++) {
        const __mmask16 left = _mm_cmpeq_epi8_mask(cd, _mm_set1_epi8((char)(4 + 2 * dy)));
        const __mmask16 right = _mm_cmpeq_epi8_mask(cd, _mm_set1_epi8((char)(5 + 2 * dy)));
        pairs[dy] = _mm512_or_si512(_mm512_maskz_mov_epi32(left, g), _mm512_maskz_mov_epi32(right, high));
    }
    *bias_sum = _mm512_mask_add_ps(*bias_sum, pass, *bias_sum, _mm512_castsi512_ps(high));
    return 1;
}

static inline __attribute__((always_inline)) __m512bh pair_at(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32((int)v);
}

/* weight_grad_taps on bf16 pairs: `used` taps of a block of `taps` (a constant at each call site). */
static inline __attribute__((always_inline)) void weight_grad_taps_dot(
    const int taps, const int64_t used, const uint16_t *tile, const int64_t *tap_offset, const __m512i *pairs,
    const int64_t *columns, int64_t live, int64_t tw, float *acc_out, int64_t co_pad) {
    __m512 acc[12], acc2[12];
    int64_t off[12];
#pragma GCC unroll 16
    for (int t = 0; t < taps; t++) {
        acc[t] = acc2[t] = _mm512_setzero_ps();
        off[t] = t < used ? tap_offset[t] : 0;
    }
    for (int64_t i = 0; i < live; i++) {
        const __m512bh top = (__m512bh)pairs[2 * i], bottom = (__m512bh)pairs[2 * i + 1];
        const uint16_t *base = tile + columns[i];
#pragma GCC unroll 16
        for (int t = 0; t < taps; t++) {
            acc[t] = _mm512_dpbf16_ps(acc[t], top, pair_at(base + off[t]));
            acc2[t] = _mm512_dpbf16_ps(acc2[t], bottom, pair_at(base + off[t] + tw));
        }
    }
    for (int t = 0; t < taps && t < used; t++)
        _mm512_storeu_ps(acc_out + t * co_pad,
                         _mm512_add_ps(_mm512_loadu_ps(acc_out + t * co_pad), _mm512_add_ps(acc[t], acc2[t])));
}

/* One pooled row's contribution to grad_weight and grad_bias for channel block b, on bf16 data: the rows of x as
 * bf16 (tile: c_in * rows rows of tw values, zero padding explicit), the gradient pairs of every live column, then
 * the taps. */
static __attribute__((noinline)) void weight_grad_row_dot(
    const uint16_t *grad, const int64_t *gs, const uint8_t *code, const int64_t *cs, const uint16_t *tile,
    const int64_t *tap_offset, __m512i *pairs, int64_t *columns, int64_t n, int64_t ph, int64_t wp, int64_t b,
    int64_t c_out, int64_t taps, int64_t tw, float *gw, float *gb, int64_t co_pad) {
    int64_t live = 0;
    const int64_t valid = c_out - b * CO_BLOCK < CO_BLOCK ? c_out - b * CO_BLOCK : CO_BLOCK;
    /* the row's bias gradient in a register: added to the partials once (a read-modify-write per column would
     * chain every column behind the previous one's store) */
    __m512 bias_sum = _mm512_setzero_ps();
    for (int64_t pw = 0; pw < wp; pw++) {
        const int64_t q = n * cs[0] + b * CO_BLOCK * cs[1] + ph * cs[2] + pw * cs[3];
        const int64_t o = n * gs[0] + b * CO_BLOCK * gs[1] + ph * gs[2] + pw * gs[3];
        if (window_grad_pairs(grad, o, gs, code, q, cs, valid, pairs + 2 * live, &bias_sum))
            columns[live++] = 2 * pw;
    }
    _mm512_storeu_ps(gb + b * CO_BLOCK, _mm512_add_ps(_mm512_loadu_ps(gb + b * CO_BLOCK), bias_sum));
    if (live == 0) return;
    float *acc_b = gw + b * CO_BLOCK;
#define TAPS(size, used, t0)                                                                                   \
    weight_grad_taps_dot(size, used, tile, tap_offset + (t0), pairs, columns, live, tw, acc_b + (t0) * co_pad, co_pad)
    FOR_TAP_BLOCKS(taps, TAPS);
#undef TAPS
}
#pragma GCC pop_options
#endif

#ifndef HAVE_DOT_BF16
#define HAVE_DOT_BF16 0
#endif

static int use_dot_bf16(int options) {
#if HAVE_DOT_BF16
    return (options & OPTION_DOT_BF16) && __builtin_cpu_supports("avx512bf16");
#else
    (void)options;
    return 0;
#endif
}

/* Whether bf16 calls with OPTION_DOT_BF16 run on AVX512-BF16 dot products here (this build and this CPU). */
int fastcnn_cpu_dot_bf16(void) { return use_dot_bf16(OPTION_DOT_BF16); }

#if HAVE_DOT_BF16
/* Rows ih0 .. ih0 + rows - 1 of bf16 image n, every channel, as bf16 with the zero padding made explicit (the
 * layout of load_rows). */
static void load_rows_bf16(const uint16_t *x, const int64_t *xs, int64_t n, int64_t c_in, int64_t h, int64_t w,
                           int64_t pad, int64_t ih0, int64_t rows, uint16_t *tile) {
    const int64_t tw = w + 2 * pad;
    for (int64_t ci = 0; ci < c_in; ci++) {
        for (int64_t r = 0; r < rows; r++) {
            uint16_t *dst = tile + (ci * rows + r) * tw;
            const int64_t ih = ih0 + r;
            if (ih < 0 || ih >= h) {
                memset(dst, 0, (size_t)tw * sizeof(uint16_t));
                continue;
            }
            for (int64_t i = 0; i < pad; i++) dst[i] = dst[pad + w + i] = 0;
            const uint16_t *src = x + n * xs[0] + ci * xs[1] + ih * xs[2];
            if (xs[3] == 1)
                memcpy(dst + pad, src, (size_t)w * sizeof(uint16_t));
            else
                for (int64_t iw = 0; iw < w; iw++) dst[pad + iw] = src[iw * xs[3]];
        }
    }
}
#endif

int fastcnn_cpu_backward_weight(const void *grad, const int64_t *gs, const uint8_t *code, const int64_t *cs,
                                const void *x, const int64_t *xs, void *grad_weight, const int64_t *gws,
                                void *grad_bias, int64_t n_batch, int64_t c_in, int64_t h, int64_t w,
                                int64_t c_out, int64_t k, int64_t pad, int dtype, int threads, int options) {
    const int64_t hp = (h + 2 * pad - k + 1) / 2, wp = (w + 2 * pad - k + 1) / 2;
    const int64_t co_pad = round_up(c_out, CO_BLOCK), blocks = co_pad / CO_BLOCK;
    const int64_t rows = k + 1, tw = w + 2 * pad, taps = c_in * k * k;
    const int dot = dtype == DTYPE_BF16 && use_dot_bf16(options), pdtype = param_dtype(options, dtype);
    (void)dot; /* read only where this build has the dot-product path */
    const int64_t part = taps * co_pad + co_pad; /* weight partials, then bias partials */
    if (threads < 1) threads = 1;
    float *partials = alloc_floats(part * threads);
    int64_t *tap_offset = malloc((size_t)(taps > 0 ? taps : 1) * sizeof(int64_t));
    if (!partials || !tap_offset) {
        free(partials);
        free(tap_offset);
        return -1;
    }
    memset(partials, 0, (size_t)(part * threads) * sizeof(float));
    for (int64_t ci = 0; ci < c_in; ci++) /* where tap (ci, ky, kx) of window position 0 sits in the tile */
        for (int64_t ky = 0; ky < k; ky++)
            for (int64_t kx = 0; kx < k; kx++) tap_offset[(ci * k + ky) * k + kx] = (ci * rows + ky) * tw + kx;
    int failed = 0;

    if (n_batch > 0 && hp > 0 && wp > 0) {
#pragma omp parallel num_threads(threads)
        {
            const int tid = omp_get_thread_num();
            float *gw = partials + (int64_t)tid * part, *gb = gw + taps * co_pad;
            float *tile = alloc_floats(c_in * rows * tw);
            v16 *gbuf = alloc_floats(4 * CO_BLOCK * wp);
            int64_t *columns = malloc((size_t)wp * sizeof(int64_t));
            if (!tile || !gbuf || !columns) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t task = 0; task < n_batch * hp; task++) {
                if (!tile || !gbuf || !columns) continue;
                const int64_t n = task / hp, ph = task % hp;
#if HAVE_DOT_BF16
                if (dot) {
                    load_rows_bf16(x, xs, n, c_in, h, w, pad, 2 * ph - pad, rows, (uint16_t *)tile);
                    for (int64_t b = 0; b < blocks; b++)
                        weight_grad_row_dot(grad, gs, code, cs, (const uint16_t *)tile, tap_offset, (__m512i *)gbuf,
                                            columns, n, ph, wp, b, c_out, taps, tw, gw, gb, co_pad);
                    continue;
                }
#endif
                load_rows(x, xs, dtype, n, c_in, h, w, pad, 2 * ph - pad, rows, tile);
                for (int64_t b = 0; b < blocks; b++) {
                    /* g_d for every pooled column of the row: grad_pooled where position d won and ReLU passes,
                     * per output channel; columns where no channel passes are left out. */
                    int64_t live = 0;
                    const int64_t valid = c_out - b * CO_BLOCK < CO_BLOCK ? c_out - b * CO_BLOCK : CO_BLOCK;
                    v16 bias_sum = {0};
                    for (int64_t pw = 0; pw < wp; pw++) {
                        const int64_t q = n * cs[0] + b * CO_BLOCK * cs[1] + ph * cs[2] + pw * cs[3];
                        const int64_t o = n * gs[0] + b * CO_BLOCK * gs[1] + ph * gs[2] + pw * gs[3];
                        v16 *gd = gbuf + 4 * live;
                        if (!window_grads(grad, o, gs, code, q, cs, valid, dtype, gd, &bias_sum))
                            continue; /* no channel passes a gradient here */
                        columns[live++] = 2 * pw;
                    }
                    *(v16u *)(gb + b * CO_BLOCK) += bias_sum;
                    if (live == 0) continue;
                    float *acc_b = gw + b * CO_BLOCK;
#define TAPS(size, used, t0)                                                                                   \
    weight_grad_taps(size, used, tile, tap_offset + (t0), gbuf, columns, live, tw, acc_b + (t0) * co_pad, co_pad)
                    FOR_TAP_BLOCKS(taps, TAPS);
#undef TAPS
                }
            }
            free(gbuf);
            free(columns);
            free(tile);
        }
    }
    /* Partials in thread order: the same sums in the same order on every run with this thread count. */
    for (int t = 1; t < threads; t++) {
        const float *src = partials + (int64_t)t * part;
        for (int64_t i = 0; i < part; i++) partials[i] += src[i];
    }
    for (int64_t co = 0; co < c_out; co++) {
        for (int64_t ci = 0; ci < c_in; ci++)
            for (int64_t ky = 0; ky < k; ky++)
                for (int64_t kx = 0; kx < k; kx++)
                    store_from_f32(grad_weight, co * gws[0] + ci * gws[1] + ky * gws[2] + kx * gws[3],
                                   rounded_to(partials[((ci * k + ky) * k + kx) * co_pad + co], dtype), pdtype);
        store_from_f32(grad_bias, co, rounded_to(partials[taps * co_pad + co], dtype), pdtype);
    }
    free(partials);
    free(tap_offset);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------- grad_input */

/* grad_x[n, ci, ih, iw] = sum over (co, ky, kx) of gy[n, co, ih + pad - ky, iw + pad - kx] * w[co, ci, ky, kx],
 * where gy, the full-size gradient of the convolution output, has one non-zero per passing pooled element (at
 * the window position its code names). So each passing pooled element adds g * w[co] onto its k x k input patch.
 * Per pooled position, the passing output channels are grouped by their winning window position; each group's
 * patch is summed in registers (PIECE floats at a time, over the group's channels) and added to the image once,
 * instead of a read-modify-write of the image per channel. The image is a padded fp32 copy that belongs to one
 * thread (one image at a time); the order of the sums does not depend on the threads. */
/* A patch row is summed in pieces of 4 vectors: 16 floats each where the build has 512-bit registers, else 8
 * (two xmm each in the baseline build); the row's tail (a multiple of 8 floats: CI_BLOCK is 8) in fewer vectors. */
#if defined(__AVX512F__)
typedef v16 vpiece;
typedef v16u vpiece_u;
#define PIECE_VEC 16
#else
typedef v8 vpiece;
typedef v8u vpiece_u;
#define PIECE_VEC 8
#endif
#define PIECE (4 * PIECE_VEC) /* floats of a patch row summed in registers at a time */

/* One piece of a patch row, `nv` vectors of type V (a constant at each call site), summed over the group's m
 * channels and added onto the image at dst. Two sets of accumulators (even and odd channels of the group): twice
 * the independent FMA chains, summed at the end in a fixed order. Each float's sum is the same whatever the
 * vector width, so the wide pieces and the 8-float tail give the numbers the 8-float pieces gave. */
#define DEFINE_PATCH_PIECE(name, V, VU, lanes)                                                                      \
    static inline __attribute__((always_inline)) void name(const int nv, const float *packed, const int32_t *cos,  \
                                                           const float *gv, int64_t m, int64_t k, int64_t ky,      \
                                                           int64_t row, int64_t p0, float *dst) {                  \
        V a[4] = {{0}, {0}, {0}, {0}}, b[4] = {{0}, {0}, {0}, {0}};                                                 \
        int64_t i = 0;                                                                                              \
        for (; i + 1 < m; i += 2) {                                                                                 \
            const float *wa = packed + (cos[i] * k + ky) * row + p0;                                                \
            const float *wb = packed + (cos[i + 1] * k + ky) * row + p0;                                            \
            const float ga = gv[i], gb = gv[i + 1];                                                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++) {                                                  \
                a[j] += ga * *(const VU *)(wa + lanes * j);                                                         \
                b[j] += gb * *(const VU *)(wb + lanes * j);                                                         \
            }                                                                                                       \
        }                                                                                                           \
        if (i < m) {                                                                                                \
            const float *wa = packed + (cos[i] * k + ky) * row + p0;                                                \
            const float ga = gv[i];                                                                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++) a[j] += ga * *(const VU *)(wa + lanes * j);        \
        }                                                                                                           \
        _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++) *(VU *)(dst + p0 + lanes * j) += a[j] + b[j];         \
    }
DEFINE_PATCH_PIECE(patch_piece, vpiece, vpiece_u, PIECE_VEC)
#if PIECE_VEC == 16
DEFINE_PATCH_PIECE(patch_piece8, v8, v8u, 8)
#endif

/* Patch row ky of one group onto dst: whole pieces, then the tail. */
static inline __attribute__((always_inline)) void patch_row(const float *packed, const int32_t *cos, const float *gv,
                                                            int64_t m, int64_t k, int64_t ky, int64_t row,
                                                            float *dst) {
    int64_t p0 = 0;
    for (; p0 + PIECE <= row; p0 += PIECE) patch_piece(4, packed, cos, gv, m, k, ky, row, p0, dst);
    switch ((row - p0) / PIECE_VEC) { /* the tail's whole vectors: 0-3 */
    case 3: patch_piece(3, packed, cos, gv, m, k, ky, row, p0, dst); break;
    case 2: patch_piece(2, packed, cos, gv, m, k, ky, row, p0, dst); break;
    case 1: patch_piece(1, packed, cos, gv, m, k, ky, row, p0, dst); break;
    default: break;
    }
#if PIECE_VEC == 16
    p0 += (row - p0) / PIECE_VEC * PIECE_VEC;
    if (p0 < row) patch_piece8(1, packed, cos, gv, m, k, ky, row, p0, dst); /* 8 floats left of a 16-float vector */
#endif
}

typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

/* f32_to_bf16 of 8 lanes: round to nearest even, NaN to the canonical quiet NaN 0x7FC0. */
static inline vh8 bf16_bits8(v8 v) {
    const vu8 u = (vu8)v;
    const vi8 nan = v != v;
    const vu8 r = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16 & (vu8)~nan) | ((vu8)nan & 0x7FC0u);
    return __builtin_convertvector(r, vh8);
}

/* Image n of the padded fp32 image (ci_pad channels per pixel) into grad_x, in its dtype: channels-last pixels
 * eight channels at a time, other layouts in tiles of 16 pixels (below). The padding channels are never stored. */
static void store_image(const float *img, void *grad_x, const int64_t *gxs, int64_t n, int64_t c_in, int64_t ci_pad,
                        int64_t h, int64_t w, int64_t pad, int64_t ww, int dtype) {
    if (gxs[1] == 1) {
        for (int64_t ih = 0; ih < h; ih++)
            for (int64_t iw = 0; iw < w; iw++) {
                const float *src = img + ((ih + pad) * ww + iw + pad) * ci_pad;
                const int64_t at = n * gxs[0] + ih * gxs[2] + iw * gxs[3];
                if (dtype != DTYPE_BF16) {
                    memcpy((float *)grad_x + at, src, (size_t)c_in * sizeof(float));
                    continue;
                }
                for (int64_t c0 = 0; c0 < c_in; c0 += 8) {
                    const vh8 bits = bf16_bits8(*(const v8u *)(src + c0));
                    memcpy((uint16_t *)grad_x + at + c0, &bits, (size_t)(c_in - c0 < 8 ? c_in - c0 : 8) * 2);
                }
            }
        return;
    }
    /* Other layouts (NCHW) take 16 pixels of a row at a time, all their channels: the 16 * ci_pad floats read stay in
     * L1 while each channel's 16 values are written (a whole image per channel would be re-read from L2). */
    for (int64_t ih = 0; ih < h; ih++)
        for (int64_t iw0 = 0; iw0 < w; iw0 += 16) {
            const int64_t cols = w - iw0 < 16 ? w - iw0 : 16;
            const float *src = img + ((ih + pad) * ww + iw0 + pad) * ci_pad;
            for (int64_t ci = 0; ci < c_in; ci++) {
                const int64_t at = n * gxs[0] + ci * gxs[1] + ih * gxs[2] + iw0 * gxs[3], step = gxs[3];
                if (dtype == DTYPE_BF16) {
                    uint16_t *dst = (uint16_t *)grad_x + at;
                    for (int64_t j = 0; j < cols; j++) dst[j * step] = f32_to_bf16(src[j * ci_pad + ci]);
                } else {
                    float *dst = (float *)grad_x + at;
                    for (int64_t j = 0; j < cols; j++) dst[j * step] = src[j * ci_pad + ci];
                }
            }
        }
}

int fastcnn_cpu_backward_input(const void *grad, const int64_t *gs, const uint8_t *code, const int64_t *cs,
                               const void *weight, const int64_t *ws, void *grad_x, const int64_t *gxs,
                               int64_t n_batch, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t k,
                               int64_t pad, int dtype, int threads, int options) {
    const int pdtype = param_dtype(options, dtype);
    const int64_t hp = (h + 2 * pad - k + 1) / 2, wp = (w + 2 * pad - k + 1) / 2;
    const int64_t ci_pad = round_up(c_in, CI_BLOCK);
    /* A patch row: k pixels x ci_pad channels, a whole number of 8-float vectors (CI_BLOCK is 8), summed PIECE
     * floats at a time and the tail in vectors; the padding channels have zero weights and land in the image's
     * padding channels, which are never stored. */
    const int64_t row = k * ci_pad;
    const int64_t hh = h + 2 * pad, ww = w + 2 * pad;
    if (n_batch <= 0) return 0;
    /* packed[(co * k + ky) * row + kx * ci_pad + ci] */
    float *packed = alloc_floats(c_out * k * row);
    if (!packed) return -1;
    memset(packed, 0, (size_t)(c_out * k * row) * sizeof(float));
    for (int64_t co = 0; co < c_out; co++)
        for (int64_t ci = 0; ci < c_in; ci++)
            for (int64_t ky = 0; ky < k; ky++)
                for (int64_t kx = 0; kx < k; kx++)
                    packed[(co * k + ky) * row + kx * ci_pad + ci] =
                        param_as(weight, co * ws[0] + ci * ws[1] + ky * ws[2] + kx * ws[3], pdtype, dtype);
    int failed = 0;

#pragma omp parallel num_threads(threads)
    {
        float *img = alloc_floats(hh * ww * ci_pad), *group_g = alloc_floats(4 * c_out);
        int32_t *group_co = malloc((size_t)(4 * c_out) * sizeof(int32_t));
        if (!img || !group_g || !group_co) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < n_batch; n++) {
            if (!img || !group_g || !group_co) continue;
            memset(img, 0, (size_t)(hh * ww * ci_pad) * sizeof(float));
            for (int64_t ph = 0; ph < hp; ph++) {
                for (int64_t pw = 0; pw < wp; pw++) {
                    int64_t count[4] = {0, 0, 0, 0};
                    const int64_t q = n * cs[0] + ph * cs[2] + pw * cs[3];
                    const int64_t o = n * gs[0] + ph * gs[2] + pw * gs[3];
                    for (int64_t co = 0; co < c_out; co++) {
                        /* Branch-free: every channel is written to its group's next slot, which only a passing
                         * one keeps (half of them pass, at random: a branch would mispredict often). */
                        const uint8_t cd = code[q + co * cs[1]];
                        const int d = cd & 3;
                        group_co[d * c_out + count[d]] = (int32_t)co;
                        group_g[d * c_out + count[d]] = load_as_f32(grad, o + co * gs[1], dtype);
                        count[d] += (cd >> 2) & 1;
                    }
                    for (int d = 0; d < 4; d++) {
                        const int64_t m = count[d];
                        if (m == 0) continue;
                        const int32_t *cos = group_co + d * c_out;
                        const float *gv = group_g + d * c_out;
                        const int64_t oh = 2 * ph + (d >> 1), ow = 2 * pw + (d & 1);
                        for (int64_t ky = 0; ky < k; ky++) {
                            float *dst = img + ((oh + ky) * ww + ow) * ci_pad;
                            patch_row(packed, cos, gv, m, k, ky, row, dst);
                        }
                    }
                }
            }
            store_image(img, grad_x, gxs, n, c_in, ci_pad, h, w, pad, ww, dtype);
        }
        free(img);
        free(group_g);
        free(group_co);
    }
    free(packed);
    return failed ? -1 : 0;
}

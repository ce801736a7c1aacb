/* Lookup-table sums for hhtl-vq weights in the codec's space (docs/design.md §7).
 *
 * One call sums, for a range of 64-row tiles of one residual stage,
 *     y[o] = Σ_g scale[g] · Σ_{s in group g} table[s][twig[o][s]]
 * where the twigs are one byte (k <= 256) in the tiled layout
 *     twig[tile][s][64]  (row o = tile * 64 + lane)
 * and the table holds int16 entries (|entry| <= 2047: 12-bit, so 16 of them sum
 * in int16 without overflow), 256 per segment, one float scale per group of
 * GROUP segments. With AVX-512BW one segment of 32 rows is eight table
 * registers, one zero-extended index load, four two-register permutes and three
 * blends; without it the same sums run in plain C.
 *
 * The module is loaded by ctypes (its functions take raw pointers the Python
 * side has checked); the CPython init below only makes it a valid extension
 * module for setuptools to build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TILE 64
#define GROUP 16
#define K 256

static void tiles_scalar(const uint8_t *tw, int64_t n_tiles, int64_t n_seg, int64_t s_a, int64_t s_b,
                         const int16_t *tab, const float *scales, float *y, int accumulate)
{
    for (int64_t t = 0; t < n_tiles; t++) {
        const uint8_t *tt = tw + t * n_seg * TILE;
        float acc[TILE];
        for (int i = 0; i < TILE; i++) acc[i] = accumulate ? y[t * TILE + i] : 0.0f;
        for (int64_t g0 = s_a; g0 < s_b; g0 += GROUP) {
            int64_t g1 = g0 + GROUP < s_b ? g0 + GROUP : s_b;
            int32_t part[TILE];
            for (int i = 0; i < TILE; i++) part[i] = 0;
            for (int64_t s = g0; s < g1; s++) {
                const uint8_t *idx = tt + s * TILE;
                const int16_t *ts = tab + s * K;
                for (int i = 0; i < TILE; i++) part[i] += ts[idx[i]];
            }
            float sc = scales[g0 / GROUP];
            for (int i = 0; i < TILE; i++) acc[i] += sc * (float)part[i];
        }
        memcpy(y + t * TILE, acc, sizeof(acc));
    }
}

/* The int16 table rows s0 .. s1 of one stage (one group of segments) for a rotated input row:
 * tab[s][kk] = rint(scale⁻¹ · Σ_i x[col(s) + i] · palt[j(s)][i][kk]), zero for kk >= k, where the
 * scale is the group's bound Σ_i |x_i| · pmax[j][i] (the largest |entry| it allows) / TABLE_MAX, so
 * no entry exceeds TABLE_MAX. palt: (npos, wmax, k) float32; pmax: (npos, wmax). */
#define TABLE_MAX 2047.0f

static float group_scale(const float *x, const int64_t *offs, const int64_t *widths, const float *pmax,
                         int64_t npos, int64_t wmax, int64_t period, int64_t s0, int64_t s1)
{
    float m = 0.0f;
    for (int64_t s = s0; s < s1; s++) {
        int64_t p = s / npos, j = s - p * npos, col = p * period + offs[j];
        float b = 0.0f;
        for (int64_t i = 0; i < widths[j]; i++) {
            float a = x[col + i] < 0 ? -x[col + i] : x[col + i];
            b += a * pmax[j * wmax + i];
        }
        if (b > m) m = b;
    }
    return m > 0 ? m / TABLE_MAX : 1.0f;
}

static void tables_scalar(const float *x, const float *palt, const int64_t *offs, const int64_t *widths,
                          int64_t npos, int64_t wmax, int64_t k, int64_t period, int64_t s0, int64_t s1,
                          float inv, int16_t *tab)
{
    float w[K];
    for (int64_t s = s0; s < s1; s++) {
        int64_t p = s / npos, j = s - p * npos, col = p * period + offs[j];
        for (int64_t kk = 0; kk < k; kk++) w[kk] = 0.0f;
        for (int64_t i = 0; i < widths[j]; i++) {
            float v = x[col + i] * inv;
            const float *pi = palt + (j * wmax + i) * k;
            for (int64_t kk = 0; kk < k; kk++) w[kk] += v * pi[kk];
        }
        int16_t *row = tab + s * K;
        for (int64_t kk = 0; kk < k; kk++) row[kk] = (int16_t)__builtin_rintf(w[kk]);
        for (int64_t kk = k; kk < K; kk++) row[kk] = 0;
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86 1

__attribute__((target("avx512f,avx512bw")))
static void tables_avx512(const float *x, const float *palt, const int64_t *offs, const int64_t *widths,
                          int64_t npos, int64_t wmax, int64_t k, int64_t period, int64_t s0, int64_t s1,
                          float inv, int16_t *tab)
{
    for (int64_t s = s0; s < s1; s++) {
        int64_t p = s / npos, j = s - p * npos, col = p * period + offs[j];
        int16_t *row = tab + s * K;
        int64_t wj = widths[j];
        for (int64_t kk = 0; kk < K; kk += 16) {
            __mmask16 m = kk + 16 <= k ? (__mmask16)0xFFFF : (kk < k ? (__mmask16)((1u << (k - kk)) - 1) : 0);
            __m512 acc = _mm512_setzero_ps();
            if (m) {
                for (int64_t i = 0; i < wj; i++) {
                    __m512 pv = _mm512_maskz_loadu_ps(m, palt + (j * wmax + i) * k + kk);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(x[col + i] * inv), pv, acc);
                }
            }
            /* round to nearest even (the default MXCSR mode), narrow to int16 */
            _mm256_storeu_si256((__m256i *)(row + kk), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(acc)));
        }
    }
}

__attribute__((target("avx512f,avx512bw")))
static inline __m512i lookup32(const __m512i *tr, __m256i idx8)
{
    __m512i idx = _mm512_cvtepu8_epi16(idx8);
    __m512i r0 = _mm512_permutex2var_epi16(tr[0], idx, tr[1]);
    __m512i r1 = _mm512_permutex2var_epi16(tr[2], idx, tr[3]);
    __m512i r2 = _mm512_permutex2var_epi16(tr[4], idx, tr[5]);
    __m512i r3 = _mm512_permutex2var_epi16(tr[6], idx, tr[7]);
    __mmask32 m6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    __mmask32 m7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
    __m512i lo = _mm512_mask_blend_epi16(m6, r0, r1);
    __m512i hi = _mm512_mask_blend_epi16(m6, r2, r3);
    return _mm512_mask_blend_epi16(m7, lo, hi);
}

__attribute__((target("avx512f,avx512bw")))
static inline __m512 widen_lo(__m512i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v))); }

__attribute__((target("avx512f,avx512bw")))
static inline __m512 widen_hi(__m512i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1))); }

__attribute__((target("avx512f,avx512bw")))
static void tiles_avx512(const uint8_t *tw, int64_t n_tiles, int64_t n_seg, int64_t s_a, int64_t s_b,
                         const int16_t *tab, const float *scales, float *y, int accumulate)
{
    for (int64_t t = 0; t < n_tiles; t++) {
        const uint8_t *tt = tw + t * n_seg * TILE;
        float *yt = y + t * TILE;
        __m512 f0, f1, f2, f3;
        if (accumulate) {
            f0 = _mm512_loadu_ps(yt); f1 = _mm512_loadu_ps(yt + 16);
            f2 = _mm512_loadu_ps(yt + 32); f3 = _mm512_loadu_ps(yt + 48);
        } else {
            f0 = f1 = f2 = f3 = _mm512_setzero_ps();
        }
        for (int64_t g0 = s_a; g0 < s_b; g0 += GROUP) {
            int64_t g1 = g0 + GROUP < s_b ? g0 + GROUP : s_b;
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
            for (int64_t s = g0; s < g1; s++) {
                const __m512i *ts = (const __m512i *)(tab + s * K);
                __m512i tr[8];
                for (int j = 0; j < 8; j++) tr[j] = _mm512_loadu_si512(ts + j);
                const uint8_t *idx = tt + s * TILE;
                a = _mm512_add_epi16(a, lookup32(tr, _mm256_loadu_si256((const __m256i *)idx)));
                b = _mm512_add_epi16(b, lookup32(tr, _mm256_loadu_si256((const __m256i *)(idx + 32))));
            }
            __m512 sc = _mm512_set1_ps(scales[g0 / GROUP]);
            f0 = _mm512_fmadd_ps(sc, widen_lo(a), f0);
            f1 = _mm512_fmadd_ps(sc, widen_hi(a), f1);
            f2 = _mm512_fmadd_ps(sc, widen_lo(b), f2);
            f3 = _mm512_fmadd_ps(sc, widen_hi(b), f3);
        }
        _mm512_storeu_ps(yt, f0);
        _mm512_storeu_ps(yt + 16, f1);
        _mm512_storeu_ps(yt + 32, f2);
        _mm512_storeu_ps(yt + 48, f3);
    }
}
#endif

static int use_avx512 = -1;
int hhtld_lut_simd(void);

/* One group of segments [s0, s1) of a stage: its int16 table rows and its scale (see above). */
void hhtld_lut_group(const float *x, const float *palt, const int64_t *offs, const int64_t *widths,
                     const float *pmax, int64_t npos, int64_t wmax, int64_t k, int64_t period, int64_t s0,
                     int64_t s1, int16_t *tab, float *scale)
{
    float sc = group_scale(x, offs, widths, pmax, npos, wmax, period, s0, s1);
    *scale = sc;
    float inv = 1.0f / sc;
#ifdef HAVE_X86
    if (hhtld_lut_simd()) {
        tables_avx512(x, palt, offs, widths, npos, wmax, k, period, s0, s1, inv, tab);
        return;
    }
#endif
    tables_scalar(x, palt, offs, widths, npos, wmax, k, period, s0, s1, inv, tab);
}

/* 1 when the AVX-512 path runs, 0 for plain C. */
int hhtld_lut_simd(void)
{
    if (use_avx512 < 0) {
#ifdef HAVE_X86
        __builtin_cpu_init();
        use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
        use_avx512 = 0;
#endif
    }
    return use_avx512;
}

/* Force the plain C path (simd = 0) or the detected one (simd = 1); returns the path in use. */
int hhtld_lut_set_simd(int simd)
{
    use_avx512 = -1;
    int have = hhtld_lut_simd();
    use_avx512 = simd ? have : 0;
    return use_avx512;
}

/* y[0 .. n_tiles * 64) (+)= the sums over segments [s_a, s_b) of one stage (s_a a multiple of
 * GROUP; n_seg the stage's segments, the tiles' stride; tab / scales from the stage's segment 0):
 * see the header. One thread takes a range of segments for every tile, so that the table rows it
 * built are the ones it reads. */
void hhtld_lut_tiles(const uint8_t *tw, int64_t n_tiles, int64_t n_seg, int64_t s_a, int64_t s_b,
                     const int16_t *tab, const float *scales, float *y, int accumulate)
{
#ifdef HAVE_X86
    if (hhtld_lut_simd()) {
        tiles_avx512(tw, n_tiles, n_seg, s_a, s_b, tab, scales, y, accumulate);
        return;
    }
#endif
    tiles_scalar(tw, n_tiles, n_seg, s_a, s_b, tab, scales, y, accumulate);
}

/* One row of one stage whose segments all have width w (one pattern position), written or added
 * at columns w * s; always inlined with a constant w. */
static inline __attribute__((always_inline)) void gather_fixed(const uint8_t *tt, int64_t n_seg, const float *palr,
                                                               int64_t wmax, const int64_t w, int accumulate,
                                                               float *row)
{
    if (accumulate) {
        for (int64_t s = 0; s < n_seg; s++) {
            const float *src = palr + tt[s * TILE] * wmax;
            float *d = row + w * s;
            for (int64_t i = 0; i < w; i++) d[i] += src[i];
        }
    } else {
        for (int64_t s = 0; s < n_seg; s++) {
            const float *src = palr + tt[s * TILE] * wmax;
            float *d = row + w * s;
            for (int64_t i = 0; i < w; i++) d[i] = src[i];
        }
    }
}

/* Rows [r0, r1) of Q (the unit-gain rows in the rotated space) from one stage's one-byte tiled
 * twigs: out[(r - r0) * n_cols + c] (+)= palette row of the twig of row r, segment s, for the
 * columns c < n_cols it covers. palr: (npos, k, wmax) float32 row-major; a period is the sum of
 * the widths; columns past n_cols (padding) are dropped. */
void hhtld_lut_gather(const uint8_t *twt, int64_t n_seg, const float *palr, const int64_t *offs,
                      const int64_t *widths, int64_t npos, int64_t k, int64_t wmax, int64_t r0, int64_t r1,
                      int64_t n_cols, int accumulate, float *out)
{
    int64_t period = 0;
    for (int64_t j = 0; j < npos; j++) period += widths[j];
    int64_t n_per = (n_seg + npos - 1) / npos;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *tt = twt + (r / TILE) * n_seg * TILE + (r % TILE);
        float *row = out + (r - r0) * n_cols;
        if (npos == 1 && offs[0] == 0 && n_seg * widths[0] <= n_cols) {  /* the ladder's patterns: one width */
            switch (widths[0]) {  /* a constant width: loops the compiler unrolls and vectorises */
            case 2: gather_fixed(tt, n_seg, palr, wmax, 2, accumulate, row); continue;
            case 3: gather_fixed(tt, n_seg, palr, wmax, 3, accumulate, row); continue;
            case 4: gather_fixed(tt, n_seg, palr, wmax, 4, accumulate, row); continue;
            case 6: gather_fixed(tt, n_seg, palr, wmax, 6, accumulate, row); continue;
            case 8: gather_fixed(tt, n_seg, palr, wmax, 8, accumulate, row); continue;
            case 16: gather_fixed(tt, n_seg, palr, wmax, 16, accumulate, row); continue;
            default: break;
            }
        }
        for (int64_t p = 0, s = 0; p < n_per; p++) {
            for (int64_t j = 0; j < npos && s < n_seg; j++, s++) {
                int64_t col = p * period + offs[j];
                const float *src = palr + (j * k + tt[s * TILE]) * wmax;
                int64_t w = widths[j];
                if (col + w > n_cols) w = n_cols - col;
                if (w <= 0) continue;
                if (accumulate) {
                    for (int64_t i = 0; i < w; i++) row[col + i] += src[i];
                } else {
                    for (int64_t i = 0; i < w; i++) row[col + i] = src[i];
                }
            }
        }
    }
}

static struct PyModuleDef lut_module = {PyModuleDef_HEAD_INIT, "_lut", "hhtld lookup-table kernels (loaded by ctypes)",
                                        -1, NULL};

PyMODINIT_FUNC PyInit__lut(void) { return PyModule_Create(&lut_module); }

/* The exact correspondence's inner loop in one pass: for each query q, s(g) = |g|^2 - 2 q.g over a block of gallery
 * vectors, folded into the query's running minimum, its gallery id and the runner-up (kappa 1), without writing the
 * (queries x gallery) matrix that a GEMM followed by a row minimum writes and reads back.
 *
 * Why: with the pyramid's few channels (24 at layer 1) the GEMM-then-reduce search is bound by that matrix's traffic,
 * not by its multiply-adds (benchmarks/README, "pruned_search.py"); here each 6 x 16 tile of s(g) stays in registers
 * and most tiles cost one comparison with the rows' runner-up.
 *
 * spade_nearest_pruned runs the same fold over a memory bank packed cluster by cluster (spade/index/bank_clusters.py):
 * each tile of queries computes its centroid values with the same register tile, bounds every cluster from below by
 * the triangle inequality and folds only the clusters a row may still need (the same winners as the whole bank).
 *
 * Built as the optional extension spade.index._nearest (setup.py) and called through ctypes
 * (spade/index/fused_nearest.py), which uses it only where the CPU has AVX2 and FMA; elsewhere, or where no
 * compiler built it, the search stays torch's GEMM. Same arithmetic contract as the GEMM: float32 dot products of
 * length C in any order, so the refinement's rounding bound (correspondence.py, _noise) covers both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 6   /* queries a tile: 6 x 2 accumulators + 2 gallery vectors + 1 broadcast = 15 of 16 ymm registers */
#define LANES 16 /* gallery columns a tile (two 8-float vectors) */

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_KERNEL 1

/* A tile some of whose values beat a row's runner-up: fold them in column order (first column wins ties). */
static void fold_tile(const float tile[ROWS][LANES], int rows, int64_t first_col, float *state, int64_t *ids)
{
    for (int r = 0; r < rows; r++) {
        const float *v = tile[r];
        float best = state[2 * r], second = state[2 * r + 1];
        int64_t id = ids[2 * r];
        for (int l = 0; l < LANES; l++) {
            float x = v[l];
            if (x < second) {
                if (x < best) {
                    second = best;
                    best = x;
                    id = first_col + l;
                } else {
                    second = x;
                }
            }
        }
        state[2 * r] = best;
        state[2 * r + 1] = second;
        ids[2 * r] = id;
    }
}

/* One tile of values: acc[r] = g_sq - 2 q_r.g for ROWS queries (qm2 rows q[r]) and the panel of 16 columns at g
 * (channel by channel), in registers (always inlined into its two callers). */
__attribute__((target("avx2,fma"), always_inline))
static inline void tile_of(const float *const q[ROWS], int channels, const float *g, const float *g_sq,
                           __m256 acc[ROWS][2])
{
    __m256 b0 = _mm256_loadu_ps(g_sq), b1 = _mm256_loadu_ps(g_sq + 8);
    for (int r = 0; r < ROWS; r++) {
        acc[r][0] = b0;
        acc[r][1] = b1;
    }
    for (int c = 0; c < channels; c++, g += LANES) {
        __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8);
        for (int r = 0; r < ROWS; r++) {
            __m256 qv = _mm256_broadcast_ss(q[r] + c);
            acc[r][0] = _mm256_fmadd_ps(qv, g0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, g1, acc[r][1]);
        }
    }
}

__attribute__((target("avx2,fma")))
static void fold_rows(const float *qm2, int rows, int channels, const float *panels, const float *g_sq,
                      int64_t columns, int64_t first_id, float *state, int64_t *ids)
{
    const float *q[ROWS];
    float limit[ROWS];
    for (int r = 0; r < ROWS; r++) {
        q[r] = qm2 + (int64_t)(r < rows ? r : rows - 1) * channels;
        limit[r] = r < rows ? state[2 * r + 1] : -INFINITY;
    }
    const float *g = panels;
    for (int64_t j = 0; j < columns; j += LANES) {
        __m256 acc[ROWS][2];
        tile_of(q, channels, g, g_sq + j, acc);
        g += (int64_t)LANES * channels;
        __m256 hit = _mm256_setzero_ps();
        for (int r = 0; r < ROWS; r++) {
            __m256 t = _mm256_broadcast_ss(limit + r);
            hit = _mm256_or_ps(hit, _mm256_cmp_ps(acc[r][0], t, _CMP_LT_OQ));
            hit = _mm256_or_ps(hit, _mm256_cmp_ps(acc[r][1], t, _CMP_LT_OQ));
        }
        if (_mm256_movemask_ps(hit)) {
            float tile[ROWS][LANES];
            for (int r = 0; r < ROWS; r++) {
                _mm256_storeu_ps(tile[r], acc[r][0]);
                _mm256_storeu_ps(tile[r] + 8, acc[r][1]);
            }
            fold_tile(tile, rows, first_id + j, state, ids);
            for (int r = 0; r < rows; r++)
                limit[r] = state[2 * r + 1];
        }
    }
}
#endif

/* 1 where spade_nearest_fold can run on this CPU (AVX2 and FMA), else 0. */
int spade_nearest_supported(void)
{
#ifdef HAVE_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Fold gallery columns into the running minimum of M queries.
 * qm2 (M, C): the queries times -2. panels (columns / 16, C, 16): the gallery vectors, 16 columns a panel, channel
 * by channel; columns a multiple of 16, padding columns with g_sq = +inf. g_sq (columns,): |g|^2. Column j has id
 * first_id + j. state (M, 2): each query's smallest s(g) and runner-up, ids (M, 2): the smallest's id in [., 0];
 * both read and updated in place. block: columns per pass over the queries (kept in L2). Returns 0, or -1 where the
 * CPU lacks AVX2/FMA (nothing done). */
int spade_nearest_fold(const float *qm2, int64_t M, int channels, const float *panels, const float *g_sq,
                       int64_t columns, int64_t first_id, float *state, int64_t *ids, int64_t block)
{
#ifdef HAVE_KERNEL
    if (!spade_nearest_supported())
        return -1;
    block = block < LANES ? LANES : block - block % LANES;
    for (int64_t c0 = 0; c0 < columns; c0 += block) {
        int64_t width = columns - c0 < block ? columns - c0 : block;
        for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
            int rows = M - r0 < ROWS ? (int)(M - r0) : ROWS;
            fold_rows(qm2 + r0 * channels, rows, channels, panels + c0 * channels, g_sq + c0, width, first_id + c0,
                      state + 2 * r0, ids + 2 * r0);
        }
    }
    return 0;
#else
    (void)qm2; (void)M; (void)channels; (void)panels; (void)g_sq; (void)columns; (void)first_id; (void)state;
    (void)ids; (void)block;
    return -1;
#endif
}

#ifdef HAVE_KERNEL
/* s(g) = g_sq - 2 q.g of up to ROWS queries against `columns` packed columns (a multiple of 16), stored in
 * out[r * stride + j]: the values fold_rows compares, written out for a few columns (a bank's centroids). */
__attribute__((target("avx2,fma")))
static void tile_values(const float *qm2, int rows, int channels, const float *panels, const float *g_sq,
                        int64_t columns, float *out, int64_t stride)
{
    const float *q[ROWS];
    for (int r = 0; r < ROWS; r++)
        q[r] = qm2 + (int64_t)(r < rows ? r : rows - 1) * channels;
    const float *g = panels;
    for (int64_t j = 0; j < columns; j += LANES) {
        __m256 acc[ROWS][2];
        tile_of(q, channels, g, g_sq + j, acc);
        g += (int64_t)LANES * channels;
        for (int r = 0; r < rows; r++) {
            _mm256_storeu_ps(out + r * stride + j, acc[r][0]);
            _mm256_storeu_ps(out + r * stride + j + 8, acc[r][1]);
        }
    }
}

/* For a tile of up to ROWS queries: bound[r * c_columns + k] a lower bound on s(g) over cluster k's members, and
 * first[r] the cluster of the nearest centroid (see spade_nearest_pruned). radius has c_columns entries. */
__attribute__((target("avx2,fma")))
static void tile_bounds(const float *qm2, int rows, int channels, int clusters, const float *c_panels,
                        const float *c_sq, int64_t c_columns, const float *radius, float slack, float rounding,
                        float largest_sq, float *bound, int64_t *first)
{
    tile_values(qm2, rows, channels, c_panels, c_sq, c_columns, bound, c_columns);
    for (int r = 0; r < rows; r++) {
        double q_sq = 0.0;
        for (int c = 0; c < channels; c++)
            q_sq += 0.25 * (double)qm2[r * channels + c] * (double)qm2[r * channels + c];
        float lowered = (float)(q_sq * (1.0 - (double)slack)), exact = (float)q_sq;
        float allowance = (float)((double)rounding * (q_sq + (double)largest_sq));
        float *b = bound + r * c_columns, nearest = INFINITY;
        first[r] = 0;
        for (int k = 0; k < clusters; k++) {
            float d2 = b[k] + lowered;
            if (d2 < nearest) {
                nearest = d2;
                first[r] = k;
            }
        }
        __m256 low = _mm256_set1_ps(lowered), zero = _mm256_setzero_ps(), less = _mm256_set1_ps(exact + allowance);
        for (int64_t k = 0; k < c_columns; k += 8) {  /* padding columns: +inf centroid values, radius 0 */
            __m256 d2 = _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(b + k), low), zero);
            __m256 reach = _mm256_max_ps(_mm256_sub_ps(_mm256_sqrt_ps(d2), _mm256_loadu_ps(radius + k)), zero);
            _mm256_storeu_ps(b + k, _mm256_sub_ps(_mm256_mul_ps(reach, reach), less));
        }
    }
}
#endif

/* The nearest columns of M queries in a bank packed cluster by cluster (spade/index/bank_clusters.py), comparing each
 * tile of ROWS queries only with the clusters that may hold a row's nearest column.
 * Cluster k holds columns starts[k] .. starts[k + 1] (multiples of 16; padding columns have g_sq = +inf); its
 * centroid is column k of c_panels (packed as the bank, c_columns a multiple of 16) with c_sq[k] = |c_k|^2 (1 - slack)
 * (padding: +inf), its radius radius[k] (no member farther from the float32 centroid; c_columns entries, padding 0). For each tile, the squared
 * centroid distances |q|^2 (1 - slack) + c_sq - 2 q.c, lowered by `slack` for their float32 rounding, give each row's
 * nearest cluster (searched first) and, by the triangle inequality, a lower bound on every cluster's s(g):
 * max(|q - c| - r, 0)^2 - |q|^2, less `rounding` (|q|^2 + largest_sq) for s's own rounding. A tile skips a cluster
 * whose bound exceeds every row's smallest s found so far, so the winners are those of spade_nearest_fold over all
 * columns (ids are packed columns); the runner-ups are not (skipped clusters never fold). state and ids as
 * spade_nearest_fold's, initialised by the caller; *folded grows by the columns each tile folded (how much pruning
 * saves on this data). Returns 0, -1 where the CPU lacks AVX2/FMA, -2 where memory ran
 * out (nothing done). */
int spade_nearest_pruned(const float *qm2, int64_t M, int channels, const float *panels, const float *g_sq,
                         int clusters, const int64_t *starts, const float *c_panels, const float *c_sq,
                         int64_t c_columns, const float *radius, float slack, float rounding, float largest_sq,
                         float *state, int64_t *ids, int64_t *folded)
{
#ifdef HAVE_KERNEL
    if (!spade_nearest_supported())
        return -1;
    unsigned char *visited = malloc(clusters > 0 ? (size_t)clusters : 1);
    float *bound = malloc(sizeof(float) * (size_t)(ROWS * (c_columns > 0 ? c_columns : 1)));
    if (visited == NULL || bound == NULL) {
        free(visited);
        free(bound);
        return -2;
    }
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        int rows = M - r0 < ROWS ? (int)(M - r0) : ROWS;
        const float *q = qm2 + r0 * channels;
        float *tile_state = state + 2 * r0;
        int64_t *tile_ids = ids + 2 * r0;
        int64_t first[ROWS];
        tile_bounds(q, rows, channels, clusters, c_panels, c_sq, c_columns, radius, slack, rounding, largest_sq, bound,
                    first);
        memset(visited, 0, (size_t)clusters);
        for (int r = 0; r < rows; r++) {
            int64_t k = first[r];
            if (visited[k])
                continue;
            visited[k] = 1;
            fold_rows(q, rows, channels, panels + starts[k] * channels, g_sq + starts[k], starts[k + 1] - starts[k],
                      starts[k], tile_state, tile_ids);
            *folded += starts[k + 1] - starts[k];
        }
        for (int k = 0; k < clusters; k++) {
            if (visited[k])
                continue;
            int needed = 0;
            for (int r = 0; r < rows && !needed; r++)
                needed = bound[r * c_columns + k] <= tile_state[2 * r];
            if (needed) {
                fold_rows(q, rows, channels, panels + starts[k] * channels, g_sq + starts[k],
                          starts[k + 1] - starts[k], starts[k], tile_state, tile_ids);
                *folded += starts[k + 1] - starts[k];
            }
        }
    }
    free(visited);
    free(bound);
    return 0;
#else
    (void)qm2; (void)M; (void)channels; (void)panels; (void)g_sq; (void)clusters; (void)starts; (void)c_panels;
    (void)c_sq; (void)c_columns; (void)radius; (void)slack; (void)rounding; (void)largest_sq; (void)state; (void)ids;
    (void)folded;
    return -1;
#endif
}


/* spade_nearest_pruned's bounds for M queries, written out: out (M, clusters) and first (M,), for tests and
 * measurements of how much a bank's clusters skip. Returns 0, -1 (no AVX2/FMA), -2 (no memory). */
int spade_cluster_bounds(const float *qm2, int64_t M, int channels, int clusters, const float *c_panels,
                         const float *c_sq, int64_t c_columns, const float *radius, float slack, float rounding,
                         float largest_sq, float *out, int64_t *first)
{
#ifdef HAVE_KERNEL
    if (!spade_nearest_supported())
        return -1;
    float *bound = malloc(sizeof(float) * (size_t)(ROWS * (c_columns > 0 ? c_columns : 1)));
    if (bound == NULL)
        return -2;
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        int rows = M - r0 < ROWS ? (int)(M - r0) : ROWS;
        tile_bounds(qm2 + r0 * channels, rows, channels, clusters, c_panels, c_sq, c_columns, radius, slack, rounding,
                    largest_sq, bound, first + r0);
        for (int r = 0; r < rows; r++)
            memcpy(out + (r0 + r) * clusters, bound + r * c_columns, sizeof(float) * (size_t)clusters);
    }
    free(bound);
    return 0;
#else
    (void)qm2; (void)M; (void)channels; (void)clusters; (void)c_panels; (void)c_sq; (void)c_columns; (void)radius;
    (void)slack; (void)rounding; (void)largest_sq; (void)out; (void)first;
    return -1;
#endif
}

#if defined(HAVE_KERNEL) && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define HAVE_BF16 1
#define SROWS 12   /* queries a screen tile: 12 x 2 accumulators of 16 columns + 2 gallery vectors + 1 broadcast (of 32) */
#define SVECS 2    /* 16-float vectors of gallery columns a screen tile */
#define SLANES (16 * SVECS)
#define CAP 128    /* candidates a query may hold before it is searched exactly instead */

/* x rounded to the nearest bfloat16 (ties to even), in the low 16 bits: what torch's .to(bfloat16) gives. */
static uint32_t bf16_bits(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

/* The float32 value spade_nearest_fold computes for query qm2 (times -2) and column j of the packed panels:
 * g_sq[j] plus the channels' fused multiply-adds in channel order, as each lane of its register tile does. */
__attribute__((target("avx2,fma")))
static float exact_value(const float *qm2, int channels, const float *panels, const float *g_sq, int64_t j)
{
    const float *g = panels + (j / LANES) * (int64_t)LANES * channels + j % LANES;
    float acc = g_sq[j];
    for (int c = 0; c < channels; c++)
        acc = fmaf(qm2[c], g[(int64_t)c * LANES], acc);
    return acc;
}

/* Drop a query's candidates whose lower bound exceeds its limit (keeping their order); returns how many are left. */
static int compact(int64_t *cols, float *xs, int count, float limit)
{
    int kept = 0;
    for (int i = 0; i < count; i++)
        if (xs[i] <= limit) {
            cols[kept] = cols[i];
            xs[kept++] = xs[i];
        }
    return kept;
}

/* acc[r][v] = sq - 2 q_r.g in bfloat16 products (float32 sums) for the SROWS queries qp[r] (their channel pairs
 * times -2) and the tile of SLANES columns at g (npairs x SLANES, two channels a lane) with |g|^2 at sq. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))
static inline void screen_tile(const uint32_t *const qp[SROWS], int npairs, const uint32_t *g, const float *sq,
                               __m512 acc[SROWS][SVECS])
{
    for (int v = 0; v < SVECS; v++) {
        __m512 m = _mm512_loadu_ps(sq + 16 * v);
        for (int r = 0; r < SROWS; r++)
            acc[r][v] = m;
    }
    for (int k = 0; k < npairs; k++, g += SLANES) {
        __m512bh gv[SVECS];
        for (int v = 0; v < SVECS; v++)
            gv[v] = (__m512bh)_mm512_loadu_si512((const void *)(g + 16 * v));
        for (int r = 0; r < SROWS; r++) {
            __m512bh b = (__m512bh)_mm512_set1_epi32((int)qp[r][k]);
            for (int v = 0; v < SVECS; v++)
                acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, gv[v]);
        }
    }
}

/* The two smallest of `upper` over its lanes (distinct columns; padding lanes +inf) into least[0], least[1], and
 * their lanes into lane[0], lane[1]. */
__attribute__((target("avx512f")))
static void two_least(__m512 upper, float least[2], int lane[2])
{
    least[0] = _mm512_reduce_min_ps(upper);
    __mmask16 at = _mm512_cmp_ps_mask(upper, _mm512_set1_ps(least[0]), _CMP_EQ_OQ);
    lane[0] = at ? __builtin_ctz(at) : -1;
    __m512 rest = _mm512_mask_mov_ps(upper, (__mmask16)(at & -at), _mm512_set1_ps(INFINITY));
    least[1] = _mm512_reduce_min_ps(rest);
    at = _mm512_cmp_ps_mask(rest, _mm512_set1_ps(least[1]), _CMP_EQ_OQ);
    lane[1] = at ? __builtin_ctz(at) : -1;
}

/* Column j's upper bound y into the smallest two bounds so far of distinct columns, least[0] <= least[1] (of
 * columns who[0], who[1]); returns the limit a column's lower bound must not exceed to stay a candidate: least[1]
 * where the runner-up is kept, else least[0], plus lift, and at most cap. A column met again (the probe's, when the
 * scan reaches it) counts once. */
static float admit(float y, int64_t j, float *least, int64_t *who, int runner_up, float lift, float cap)
{
    if (j != who[0] && j != who[1]) {
        if (y < least[0]) {
            least[1] = least[0];
            who[1] = who[0];
            least[0] = y;
            who[0] = j;
        } else if (y < least[1]) {
            least[1] = y;
            who[1] = j;
        }
    }
    float limit = least[runner_up] + lift;
    return limit < cap ? limit : cap;
}

/* Screen `rows` queries (up to SROWS) against every column in bfloat16, then fold the candidates into each query's
 * state in the float32 kernel's arithmetic (see spade_fold_bf16). pairs[r * npairs + k]: query r's centred channels
 * 2k, 2k + 1 times -2 as two bfloat16; a[r], lift[r], cap[r]: its bound's slope (times a column's centred norm), its
 * constant, and the limit its incoming state sets. probe (npairs x SLANES), probe_sq, probe_norm: a tile of likely
 * winners (distinct recent winners), screened first so that each limit is tight from the start and few tiles need the
 * scalar pass. */
__attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma")))
static void screen_rows(const float *q, int rows, int channels, const uint32_t *pairs, int npairs, const float *a,
                        const float *lift, const float *cap, int runner_up, const uint32_t *screen,
                        const float *screen_sq, const float *screen_norm, int64_t columns, const uint32_t *probe,
                        const int64_t *probe_ids, const float *probe_sq, const float *probe_norm, const float *panels,
                        const float *g_sq, int64_t width, int64_t first_id, int64_t *cols, float *xs, float *qm2,
                        float *state, int64_t *ids, int64_t *counts)
{
    int count[SROWS] = {0}, over[SROWS] = {0};
    float limit[SROWS], least[SROWS][2];
    int64_t who[SROWS][2];
    const uint32_t *qp[SROWS];  /* a tile's rows past `rows` repeat the first */
    for (int r = 0; r < SROWS; r++)
        qp[r] = pairs + (r < rows ? r : 0) * npairs;
    __m512 acc[SROWS][SVECS];
    screen_tile(qp, npairs, probe, probe_sq, acc);
    for (int r = 0; r < rows; r++) {
        __m512 slope = _mm512_set1_ps(a[r]);
        least[r][0] = least[r][1] = FLT_MAX;
        who[r][0] = who[r][1] = -1;
        limit[r] = cap[r];
        for (int v = 0; v < SVECS; v++) {
            float two[2];
            int lane[2];
            two_least(_mm512_fmadd_ps(slope, _mm512_loadu_ps(probe_norm + 16 * v), acc[r][v]), two, lane);
            for (int i = 0; i < 2; i++)
                if (lane[i] >= 0 && two[i] < FLT_MAX)
                    limit[r] = admit(two[i], probe_ids[16 * v + lane[i]], least[r], who[r], runner_up, lift[r],
                                     cap[r]);
        }
    }
    for (int64_t j0 = 0; j0 < columns; j0 += SLANES) {
        screen_tile(qp, npairs, screen + j0 * npairs, screen_sq + j0, acc);
        __m512 n[SVECS];
        for (int v = 0; v < SVECS; v++)
            n[v] = _mm512_loadu_ps(screen_norm + j0 + 16 * v);
        uint64_t hits[SROWS], any = 0;
        for (int r = 0; r < rows; r++) {
            __m512 slope = _mm512_set1_ps(a[r]), lim = _mm512_set1_ps(limit[r]);
            hits[r] = 0;
            for (int v = 0; v < SVECS; v++) {
                acc[r][v] = _mm512_fnmadd_ps(slope, n[v], acc[r][v]);
                hits[r] |= (uint64_t)_mm512_cmp_ps_mask(acc[r][v], lim, _CMP_LE_OQ) << (16 * v);
            }
            any |= hits[r];
        }
        if (!any)
            continue;
        for (int r = 0; r < rows; r++) {
            if (!hits[r] || over[r])
                continue;
            float low[SLANES];
            for (int v = 0; v < SVECS; v++)
                _mm512_storeu_ps(low + 16 * v, acc[r][v]);
            int64_t *c = cols + (int64_t)r * CAP;
            float *x = xs + (int64_t)r * CAP;
            for (uint64_t h = hits[r]; h; h &= h - 1) {
                int l = __builtin_ctzll(h);
                if (low[l] > limit[r])
                    continue;
                if (count[r] == CAP) {
                    count[r] = compact(c, x, count[r], limit[r]);
                    if (count[r] == CAP) {
                        over[r] = 1;
                        break;
                    }
                }
                c[count[r]] = j0 + l;
                x[count[r]++] = low[l];
                limit[r] = admit(low[l] + 2.0f * a[r] * screen_norm[j0 + l], j0 + l, least[r], who[r], runner_up,
                                 lift[r], cap[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < channels; c++)
            qm2[c] = -2.0f * q[(int64_t)r * channels + c];
        float *st = state + 2 * r;
        int64_t *id = ids + 2 * r;
        if (over[r]) {
            fold_rows(qm2, 1, channels, panels, g_sq, width, first_id, st, id);
            counts[1]++;
            continue;
        }
        for (int i = 0; i < count[r]; i++) {  /* in column order, as fold_tile folds: the first column wins ties */
            if (xs[(int64_t)r * CAP + i] > limit[r])
                continue;
            int64_t j = cols[(int64_t)r * CAP + i];
            float f = exact_value(qm2, channels, panels, g_sq, j);
            counts[0]++;
            if (f < st[1]) {
                if (f < st[0]) {
                    st[1] = st[0];
                    st[0] = f;
                    id[0] = first_id + j;
                } else {
                    st[1] = f;
                }
            }
        }
    }
}

/* Gather the distinct columns among ids[0 .. SLANES) (-1: none) of the screen into one tile, as screen_rows' probe
 * (repeats and missing ones: padding lanes, +inf). */
static void gather_probe(const int64_t *ids, const uint32_t *screen, const float *screen_sq, const float *screen_norm,
                         int npairs, uint32_t *probe, int64_t *probe_ids, float *probe_sq, float *probe_norm)
{
    for (int l = 0; l < SLANES; l++) {
        int64_t j = ids[l];
        for (int e = 0; e < l && j >= 0; e++)
            if (ids[e] == j)
                j = -1;
        probe_ids[l] = j;
        const uint32_t *g = j < 0 ? NULL : screen + (j / SLANES) * SLANES * npairs + j % SLANES;
        for (int k = 0; k < npairs; k++)
            probe[k * SLANES + l] = g == NULL ? 0u : g[(int64_t)k * SLANES];
        probe_sq[l] = j < 0 ? INFINITY : screen_sq[j];
        probe_norm[l] = j < 0 ? 0.0f : screen_norm[j];
    }
}
#endif

/* 1 where spade_fold_bf16 can run on this CPU (AVX512-BF16 besides AVX2 and FMA), else 0. */
int spade_bf16_supported(void)
{
#ifdef HAVE_BF16
    __builtin_cpu_init();
    return spade_nearest_supported() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* spade_nearest_fold's very result, comparing each query in float32 with only the few columns a bfloat16 screen
 * cannot rule out: state and ids as that kernel leaves them (the smallest value, its id, the first column on ties,
 * and, with runner_up, the runner-up value; without it the runner-up may be larger than that kernel's).
 *
 * The screen: the queries and columns, centred on `centre` (NULL: as they are), are rounded to bfloat16 (relative
 * error 2^-8 each), and t(g) = |g|^2 - 2 q.g of the centred vectors is summed by vdpbf16ps (float32 accumulation)
 * from screen_sq = |g|^2. Each t(g) is within E = slope |g| + lift / 2 of spade_nearest_fold's value less a constant
 * of the query's (0 without a centre; the same for every column, so the order is that of the uncentred values): slope
 * covers the products' rounding, 2^-6 |q| |g| by Cauchy-Schwarz, and the float32 sums; lift the float32 kernel's own
 * rounding. A column whose t(g) - E exceeds some column's t(g) + E (the second such column's, with runner_up), or
 * without a centre the incoming runner-up, cannot change the state; every other one is folded in column order with
 * spade_nearest_fold's float32 arithmetic.
 * q (M, C) the queries, uncentred. screen (columns / 32, ceil(C / 2), 32) uint32: the centred columns, two bfloat16
 * channels a lane (channel 2k in the low half; an odd C padded with 0); screen_sq, screen_norm (columns): |g|^2 and
 * |g| of the centred float32 columns (padding: +inf, 0); columns a multiple of 32. panels, g_sq, width: those of
 * spade_nearest_fold (its panels of 16 over the same columns, width of them with padding); first_id: column 0's id.
 * centred_max, plain_max: the largest |g| centred and uncentred. state (M, 2), ids (M, 2): as spade_nearest_fold's
 * (with a centre, they must start at +inf). counts[0] grows by the columns compared exactly, counts[1] by the queries
 * whose candidates overflowed (folded by spade_nearest_fold instead). Returns 0, -1 where the CPU lacks AVX512-BF16
 * (nothing done), -2 where memory ran out. */
int spade_fold_bf16(const float *q, int64_t M, int channels, const float *centre, const uint32_t *screen,
                    const float *screen_sq, const float *screen_norm, int64_t columns, const float *panels,
                    const float *g_sq, int64_t width, int64_t first_id, float centred_max, float plain_max,
                    int runner_up, float *state, int64_t *ids, int64_t *counts)
{
#ifdef HAVE_BF16
    if (!spade_bf16_supported())
        return -1;
    int npairs = (channels + 1) / 2;
    uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)(SROWS * npairs));
    int64_t *cols = malloc(sizeof(int64_t) * SROWS * CAP);
    float *xs = malloc(sizeof(float) * SROWS * CAP), *qm2 = malloc(sizeof(float) * (size_t)channels);
    uint32_t *probe = malloc(sizeof(uint32_t) * (size_t)(SLANES * npairs));
    if (pairs == NULL || cols == NULL || xs == NULL || qm2 == NULL || probe == NULL) {
        free(pairs);
        free(cols);
        free(xs);
        free(qm2);
        free(probe);
        return -2;
    }
    int64_t recent[SLANES], probe_ids[SLANES];  /* the last SLANES winners among these columns: neighbours share many */
    float probe_sq[SLANES], probe_norm[SLANES];
    for (int l = 0; l < SLANES; l++)
        recent[l] = -1;
    int64_t next = 0;
    /* slope: 2^-6 (1.01) for the products, and (4 C + 64) 2^-24 of |g|^2 + 2.1 |q| |g| for every float32 sum and
     * bound's rounding (about 2 C + 10 of them), both per |g|; lift: twice the float32 kernel's error. */
    const double unit = ldexp(1.0, -24), sums = (4.0 * channels + 64.0) * unit;
    runner_up = runner_up ? 1 : 0;
    for (int64_t r0 = 0; r0 < M; r0 += SROWS) {
        int rows = M - r0 < SROWS ? (int)(M - r0) : SROWS;
        float a[SROWS], lift[SROWS], cap[SROWS];
        for (int r = 0; r < rows; r++) {
            const float *qr = q + (r0 + r) * channels;
            double centred_sq = 0.0, plain_sq = 0.0;
            for (int k = 0; k < npairs; k++) {
                float lo = centre == NULL ? qr[2 * k] : qr[2 * k] - centre[2 * k];
                float hi = 2 * k + 1 >= channels ? 0.0f : centre == NULL ? qr[2 * k + 1]
                                                                          : qr[2 * k + 1] - centre[2 * k + 1];
                centred_sq += (double)lo * lo + (double)hi * hi;
                pairs[r * npairs + k] = bf16_bits(-2.0f * lo) | bf16_bits(-2.0f * hi) << 16;
            }
            for (int c = 0; c < channels; c++)
                plain_sq += (double)qr[c] * qr[c];
            double qc = sqrt(centred_sq), qp = sqrt(plain_sq);
            a[r] = (float)((ldexp(1.0, -6) * 1.01 * qc + sums * (centred_max + 2.1 * qc)) * 1.0001);
            lift[r] = (float)(2.0 * sums * ((double)plain_max * plain_max + 2.1 * qp * plain_max) + 1e-30);
            float incoming = state[2 * (r0 + r) + runner_up];
            cap[r] = centre == NULL && incoming < FLT_MAX ? incoming + lift[r] : FLT_MAX;
        }
        gather_probe(recent, screen, screen_sq, screen_norm, npairs, probe, probe_ids, probe_sq, probe_norm);
        screen_rows(q + r0 * channels, rows, channels, pairs, npairs, a, lift, cap, runner_up, screen, screen_sq,
                    screen_norm, columns, probe, probe_ids, probe_sq, probe_norm, panels, g_sq, width, first_id, cols,
                    xs, qm2,
                    state + 2 * r0, ids + 2 * r0, counts);
        for (int r = 0; r < rows; r++) {
            int64_t j = ids[2 * (r0 + r)] - first_id;
            if (j >= 0 && j < columns) {
                recent[next] = j;
                next = (next + 1) % SLANES;
            }
        }
    }
    free(pairs);
    free(cols);
    free(xs);
    free(qm2);
    free(probe);
    return 0;
#else
    (void)q; (void)M; (void)channels; (void)centre; (void)screen; (void)screen_sq; (void)screen_norm; (void)columns;
    (void)panels; (void)g_sq; (void)width; (void)first_id; (void)centred_max; (void)plain_max; (void)runner_up;
    (void)state; (void)ids; (void)counts;
    return -1;
#endif
}

/* An importable module, so that Python finds the library's file; the functions are called through ctypes. */
static struct PyModuleDef nearest_module = {PyModuleDef_HEAD_INIT, "_nearest",
                                            "spade_nearest_fold, spade_nearest_pruned, spade_cluster_bounds, spade_fold_bf16: see spade/index/fused_nearest.py", -1, NULL};

PyMODINIT_FUNC PyInit__nearest(void) { return PyModule_Create(&nearest_module); }

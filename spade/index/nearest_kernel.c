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

/* An importable module, so that Python finds the library's file; the functions are called through ctypes. */
static struct PyModuleDef nearest_module = {PyModuleDef_HEAD_INIT, "_nearest",
                                            "spade_nearest_fold, spade_nearest_pruned, spade_cluster_bounds: see spade/index/fused_nearest.py", -1, NULL};

PyMODINIT_FUNC PyInit__nearest(void) { return PyModule_Create(&nearest_module); }

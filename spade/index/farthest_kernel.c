/* Greedy farthest-point selection (the coreset pass of spade/index/coreset.py) with most rows skipped, still exact.
 *
 * Why: each step of the plain pass reads every candidate row to lower its distance to the chosen set, so a few
 * thousand steps over 200,000 rows read the rows a few thousand times (memory-bound: about a second for metal_plate's
 * layer-1 bank at fit, tens of seconds for the larger banks). A step can only lower the distances of rows nearer the
 * new point than their current distance; by the triangle inequality a whole block of rows is out of reach when the new
 * point is farther from the block's centre than the block's radius plus the square root of its largest distance.
 *
 * Blocks: the rows grouped by the chosen point nearest to them (their Voronoi cells), re-formed each time the chosen
 * set doubles; a block's centre is its chosen point, its radius the largest member distance at forming. Rows are kept
 * in block order in panels of eight (channel by channel, eight rows side by side: one copy of the candidates), each
 * block padded to whole panels, so a visited block is one contiguous read, eight rows to a vector.
 *
 * Exact up to float32 rounding: distances are the float32 sums of squared differences, the skip test is lowered by
 * a relative margin far above that rounding, so a skipped block holds no row whose distance would have fallen. Ties
 * between equal distances go to the first block, then the first row in it (not the first row of the input).
 *
 * Built as the optional extension spade.index._farthest (setup.py), called through ctypes by
 * spade/index/farthest_points.py, which falls back to torch's plain pass where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#define HAVE_THREADS 1
#endif

#define MARGIN 1e-5f  /* relative allowance on the skip test: float32 rounding of the distances is ~1e-7 per channel */
#define W 8           /* rows a panel (a vector of floats) */
#define FIRST_BLOCKS 16  /* blocks are first formed at this many chosen rows (fewer skip next to nothing) */
#define MAX_THREADS 64
#define PARALLEL_ROWS 16384  /* a step reading fewer rows runs on the calling thread alone (waking others costs more) */

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between static functions only: no ABI crosses a boundary */
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#define VARIANTS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VARIANTS
#endif

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Squared distances of the P panels from panel (c x W floats each) to y, into out[0 .. P-1]: two accumulators a panel
 * (even and odd channels), so that 2P independent multiply-add chains hide their latency. */
#define PANELS(P)                                                                                                   \
    static inline void panels_##P(const float *panel, int c, const float *y, vf *out)                              \
    {                                                                                                               \
        vf even[P], odd[P];                                                                                         \
        for (int j = 0; j < P; j++)                                                                                 \
            even[j] = odd[j] = (vf){0, 0, 0, 0, 0, 0, 0, 0};                                                        \
        int i = 0;                                                                                                  \
        for (; i + 2 <= c; i += 2)                                                                                  \
            for (int j = 0; j < P; j++) {                                                                           \
                vf d0 = load(panel + (j * c + i) * W) - y[i], d1 = load(panel + (j * c + i + 1) * W) - y[i + 1];   \
                even[j] += d0 * d0;                                                                                 \
                odd[j] += d1 * d1;                                                                                  \
            }                                                                                                       \
        for (; i < c; i++)                                                                                          \
            for (int j = 0; j < P; j++) {                                                                           \
                vf d = load(panel + (j * c + i) * W) - y[i];                                                       \
                even[j] += d * d;                                                                                   \
            }                                                                                                       \
        for (int j = 0; j < P; j++)                                                                                 \
            out[j] = even[j] + odd[j];                                                                              \
    }
PANELS(1)
PANELS(4)

/* Fold one panel's distances into mind (owner set to s where lowered) and the running maximum. */
static inline void fold_panel(vf acc, float *mind, int64_t *owner, int64_t q, int64_t s, vf *best)
{
    vf m = load(mind + q);
    vi lower = (m > 0.0f) & (acc < m);
    int changed = 0;
    for (int l = 0; l < W; l++)
        changed |= lower[l];
    if (changed) {
        m = (vf)(((vi)acc & lower) | ((vi)m & ~lower));
        store(mind + q, m);
        for (int l = 0; l < W; l++)
            if (lower[l])
                owner[q + l] = s;
    }
    vi up = m > *best;
    *best = (vf)(((vi)m & up) | ((vi)*best & ~up));
}

/* Lower mind[lo, hi) (whole panels) to the rows' squared distances to y where smaller (owner set to s); chosen and
 * padding rows (-1) and duplicates of chosen rows (0) are untouched. Returns the block's largest distance, its row in
 * *arg. Panel g holds channel i of its rows at x[(g * c + i) * W ..]; four panels at a time. */
VARIANTS
static float lower_block(const float *x, int c, const float *y, int64_t lo, int64_t hi, float *mind, int64_t *owner,
                         int64_t s, int64_t *arg)
{
    vf best = {-2, -2, -2, -2, -2, -2, -2, -2};
    vf acc[4];
    int64_t q = lo;
    for (; q + 4 * W <= hi; q += 4 * W) {
        panels_4(x + q * c, c, y, acc);
        for (int j = 0; j < 4; j++)
            fold_panel(acc[j], mind, owner, q + j * W, s, &best);
    }
    for (; q < hi; q += W) {
        panels_1(x + q * c, c, y, acc);
        fold_panel(acc[0], mind, owner, q, s, &best);
    }
    float top = -2.0f;
    for (int l = 0; l < W; l++)
        top = best[l] > top ? best[l] : top;
    int64_t at = lo;
    while (at < hi && mind[at] != top)
        at++;
    *arg = at < hi ? at : lo;
    return top;
}

/* Squared distances of the point y to centres 0 .. count-1 (channel i of centre b at ct[i * kcap + b]) into out. */
VARIANTS
static void centre_distances(const float *ct, int64_t kcap, int c, const float *y, int64_t count, float *out)
{
    for (int64_t b = 0; b < count; b += W) {
        vf acc = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < c; i++) {
            vf d = load(ct + i * kcap + b) - y[i];
            acc += d * d;
        }
        store(out + b, acc);
    }
}

/* The largest distance of a block's rows [lo, hi) and its row. */
static float block_max(const float *mind, int64_t lo, int64_t hi, int64_t *arg)
{
    float m = -2.0f;
    int64_t at = lo;
    for (int64_t p = lo; p < hi; p++)
        if (mind[p] > m) {
            m = mind[p];
            at = p;
        }
    *arg = at;
    return m;
}

/* Regroup the rows (bstart[*nblocks] of them, padding included) of the half *half of the two-half buffers x, pos and
 * mind (cap rows each) into the other half by owner, the step of their nearest chosen point (0 .. blocks-1; padding
 * rows -1, dropped), each group padded to whole panels (padding: pos and owner -1, mind -1), switch *half, and set each
 * block's bounds, largest distance and radius. Returns 0 or -2 (no memory). */
static int reblock(float *x_all, int64_t *pos_all, float *mind_all, int64_t *half, int64_t *owner, int64_t cap, int c,
                   int64_t *nblocks, int64_t blocks, int64_t *bstart, float *brad, float *bmax, int64_t *barg)
{
    int64_t rows = bstart[*nblocks], from_half = *half, to_half = 1 - *half;
    const float *x = x_all + from_half * cap * c, *mind = mind_all + from_half * cap;
    const int64_t *pos = pos_all + from_half * cap;
    float *x2 = x_all + to_half * cap * c, *mind2 = mind_all + to_half * cap;
    int64_t *pos2 = pos_all + to_half * cap;
    int64_t *fill = calloc((size_t)blocks + 1, sizeof(int64_t));
    if (fill == NULL)
        return -2;
    for (int64_t p = 0; p < rows; p++)
        if (owner[p] >= 0)
            fill[owner[p] + 1]++;
    for (int64_t b = 0; b < blocks; b++)
        fill[b + 1] = fill[b] + (fill[b + 1] + W - 1) / W * W;
    memcpy(bstart, fill, sizeof(int64_t) * (size_t)(blocks + 1));
    int64_t total = bstart[blocks];
    for (int64_t p = 0; p < total; p++) {
        pos2[p] = -1;
        mind2[p] = -1.0f;
    }
    for (int64_t p = 0; p < rows; p++) {
        if (owner[p] < 0)
            continue;
        int64_t to = fill[owner[p]]++;
        const float *src = x + (p / W) * c * W + p % W;
        float *into = x2 + (to / W) * c * W + to % W;
        for (int i = 0; i < c; i++)
            into[i * W] = src[i * W];
        pos2[to] = pos[p];
        mind2[to] = mind[p];
    }
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t p = bstart[b]; p < bstart[b + 1]; p++)
            owner[p] = pos2[p] >= 0 ? b : -1;
        bmax[b] = block_max(mind2, bstart[b], bstart[b + 1], &barg[b]);
        brad[b] = bmax[b] > 0 ? sqrtf(bmax[b]) * (1.0f + MARGIN) : 0.0f;
    }
    *nblocks = blocks;
    *half = to_half;
    free(fill);
    return 0;
}

/* A run of a block's rows read by one thread in a step, and what it found there. */
typedef struct {
    int64_t block, lo, hi, arg;
    float top;
} segment_t;

/* What the threads of a step share: thread t reads segments first[t] .. first[t + 1] - 1. */
typedef struct {
    const float *x;
    const float *y;
    float *mind;
    int64_t *owner;
    segment_t *seg;
    int64_t first[MAX_THREADS + 1];
    int64_t s;
    int c, threads;
#ifdef HAVE_THREADS
    atomic_long generation;
    atomic_int done;
    atomic_int quit;
#endif
} step_t;

static void read_segments(step_t *st, int t)
{
    for (int64_t i = st->first[t]; i < st->first[t + 1]; i++) {
        segment_t *g = &st->seg[i];
        g->top = lower_block(st->x, st->c, st->y, g->lo, g->hi, st->mind, st->owner, st->s, &g->arg);
    }
}

#ifdef HAVE_THREADS
typedef struct {
    step_t *st;
    int t;
} helper_t;

/* Wait (spinning, then yielding the core) until *value differs from seen (generation) or reaches seen (done). */
static long wait_for(atomic_long *value, long seen)
{
    long now;
    for (int spins = 0; (now = atomic_load_explicit(value, memory_order_acquire)) == seen; spins++)
        if (spins > 256)
            sched_yield();
    return now;
}

static void *helper(void *arg)
{
    helper_t *h = arg;
    step_t *st = h->st;
    long seen = 0;
    for (;;) {
        seen = wait_for(&st->generation, seen);
        if (atomic_load_explicit(&st->quit, memory_order_acquire))
            return NULL;
        read_segments(st, h->t);
        atomic_fetch_add_explicit(&st->done, 1, memory_order_acq_rel);
    }
}
#endif

/* Steps [from, to) of the selection of k rows out of n, state kept by the caller between calls (so that it can report
 * progress). x_all, pos_all, mind_all: two halves of cap rows each (cap >= n + W * (k + 1)), *half the one in use (the
 * other the one the groups are re-formed into): x the rows in panels of W (row q's channel i at
 * x[(q / W * c + i) * W + q % W]); pos, mind: each row's input position and squared distance to the chosen set (-1:
 * chosen or padding); owner (cap): its nearest chosen step (-1: padding); chosen (k): input positions in selection
 * order; ct (c x kcap, kcap >= k + W): the chosen rows, channel-major; *blocks, bstart (k + 1), brad, bmax, barg,
 * dist (kcap): the blocks, bstart[*blocks] the rows in use, and their centres' distances to the new point; *visited
 * counts the rows the steps read; threads: how many threads read a step's rows. Call first with from = 1,
 * *blocks = 0, *half = 0, the first half's x and pos (-1 past n) and owner (0, -1 past n) in input order, padded to
 * whole panels, and chosen[0] the first row. Returns 0, -2 (no memory for its scratch), -3 (bad arguments). */
int spade_farthest_steps(float *x_all, int64_t cap, int64_t *pos_all, float *mind_all, int64_t *half, int64_t *owner,
                         int64_t n, int c, int64_t *chosen, float *ct, int64_t kcap, int64_t k, int64_t from,
                         int64_t to, int64_t *blocks, int64_t *bstart, float *brad, float *bmax, int64_t *barg,
                         float *dist, int64_t *visited, int threads)
{
    if (n < 1 || c < 1 || k < 1 || k > n || cap < n + W * (k + 1) || kcap < k + W || from < 1 || to > k
        || chosen[0] < 0 || chosen[0] >= n || (*half != 0 && *half != 1))
        return -3;
    float *x = x_all + *half * cap * c, *mind = mind_all + *half * cap;
    int64_t *pos = pos_all + *half * cap;
#ifndef HAVE_THREADS
    threads = 1;
#endif
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    float *y = malloc(sizeof(float) * (size_t)c);
    step_t *st = calloc(1, sizeof(step_t));
    segment_t *seg = malloc(sizeof(segment_t) * (size_t)(2 * (k + 1) + MAX_THREADS));  /* blocks, then their cuts */
    if (y == NULL || st == NULL || seg == NULL) {
        free(y); free(st); free(seg);
        return -2;
    }
    st->x = x; st->y = y; st->mind = mind; st->owner = owner; st->seg = seg; st->c = c; st->threads = threads;
#ifdef HAVE_THREADS
    pthread_t ids[MAX_THREADS];
    helper_t helpers[MAX_THREADS];
    int started = 1;
    for (; started < threads; started++) {
        helpers[started] = (helper_t){st, started};
        if (pthread_create(&ids[started], NULL, helper, &helpers[started]))
            break;
    }
    threads = started;  /* as many as could be started */
#endif
    if (*blocks == 0) {
        int64_t rows = (n + W - 1) / W * W, first = chosen[0];
        for (int i = 0; i < c; i++)
            ct[i * kcap] = y[i] = x[(first / W * c + i) * W + first % W];
        for (int64_t p = 0; p < rows; p++)
            mind[p] = p < n ? INFINITY : -1.0f;
        int64_t arg;
        lower_block(x, c, y, 0, rows, mind, owner, 0, &arg);
        mind[first] = -1.0f;
        bstart[0] = 0;
        bstart[1] = rows;
        *blocks = 1;
        bmax[0] = block_max(mind, 0, rows, &barg[0]);
        brad[0] = sqrtf(bmax[0] > 0 ? bmax[0] : 0.0f) * (1.0f + MARGIN);
    }
    int status = 0;
    for (int64_t s = from; s < to && !status; s++) {
        int64_t nb = *blocks, best = 0;
        for (int64_t b = 1; b < nb; b++)
            if (bmax[b] > bmax[best])
                best = b;
        int64_t p = barg[best];
        chosen[s] = pos[p];
        for (int i = 0; i < c; i++)
            ct[i * kcap + s] = y[i] = x[(p / W * c + i) * W + p % W];
        mind[p] = -1.0f;
        owner[p] = s;
        centre_distances(ct, kcap, c, y, nb, dist);
        int64_t nseg = 0, rows = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (b != best) {
                if (bmax[b] <= 0.0f)
                    continue;  /* only chosen rows and duplicates of them: nothing to lower */
                float reach = sqrtf(dist[b]) * (1.0f - MARGIN) - brad[b];
                if (reach > 0.0f && reach * reach > bmax[b] * (1.0f + MARGIN))
                    continue;  /* every row is nearer its own chosen point than the new one */
            }
            seg[nseg++] = (segment_t){b, bstart[b], bstart[b + 1], 0, 0.0f};
            rows += bstart[b + 1] - bstart[b];
        }
        *visited += rows;
        st->s = s;
        int parts = rows >= PARALLEL_ROWS ? threads : 1;
        if (parts == 1) {
            st->first[0] = 0;
            st->first[1] = nseg;
            read_segments(st, 0);
        } else {
            /* cut the runs into parts of equal rows (whole panels), splitting a block where a part ends */
            int64_t quota = (rows / parts + W - 1) / W * W, filled = 0, out = 0;
            segment_t *cut = seg + nseg;  /* the cut list is built after the blocks, then moved down */
            int t = 0;
            st->first[0] = 0;
            for (int64_t i = 0; i < nseg; i++) {
                int64_t lo = seg[i].lo, hi = seg[i].hi;
                while (lo < hi) {
                    int64_t take = hi - lo < quota - filled || t == parts - 1 ? hi - lo : quota - filled;
                    cut[out++] = (segment_t){seg[i].block, lo, lo + take, 0, 0.0f};
                    lo += take;
                    filled += take;
                    if (filled >= quota && t < parts - 1) {
                        st->first[++t] = out;
                        filled = 0;
                    }
                }
            }
            while (t < parts - 1)
                st->first[++t] = out;
            st->first[parts] = out;
            memmove(seg, cut, sizeof(segment_t) * (size_t)out);
            nseg = out;
#ifdef HAVE_THREADS
            atomic_store_explicit(&st->done, 0, memory_order_release);
            atomic_fetch_add_explicit(&st->generation, 1, memory_order_acq_rel);
            read_segments(st, 0);
            while (atomic_load_explicit(&st->done, memory_order_acquire) < parts - 1)
                sched_yield();
#endif
        }
        for (int64_t i = 0; i < nseg; i++) {
            int64_t b = seg[i].block;
            if (i == 0 || seg[i - 1].block != b || seg[i].top > bmax[b]) {
                bmax[b] = seg[i].top;
                barg[b] = seg[i].arg;
            }
        }
        int64_t count = s + 1;
        if (count < k && count >= FIRST_BLOCKS && (count & (count - 1)) == 0) {
            status = reblock(x_all, pos_all, mind_all, half, owner, cap, c, blocks, count, bstart, brad, bmax, barg);
            x = x_all + *half * cap * c;
            mind = mind_all + *half * cap;
            pos = pos_all + *half * cap;
            st->x = x;
            st->mind = mind;
        }
    }
#ifdef HAVE_THREADS
    atomic_store_explicit(&st->quit, 1, memory_order_release);
    atomic_fetch_add_explicit(&st->generation, 1, memory_order_acq_rel);
    for (int t = 1; t < threads; t++)
        pthread_join(ids[t], NULL);
#endif
    free(y); free(st); free(seg);
    return status;
}

/* An importable module, so that Python finds the library's file; the function is called through ctypes. */
static struct PyModuleDef farthest_module = {PyModuleDef_HEAD_INIT, "_farthest",
                                             "spade_farthest_steps: see spade/index/farthest_points.py", -1, NULL};

PyMODINIT_FUNC PyInit__farthest(void) { return PyModule_Create(&farthest_module); }

/* Read rates of the access patterns a weight stream can take, on this CPU.
 *
 * Each thread reads its own 512 MiB region (far beyond the caches), best of
 * 5 passes, and the program prints GB/s for 1 thread and for the threads
 * given (default 2):
 *
 *   sequential         one ascending stream (32-byte loads, 4 lines per step)
 *   rows R, chunk C    the region as matrices of 256 rows of R bytes; groups of
 *                      32 rows read side by side, line s of every row of the
 *                      group before line s + 1, C bytes of each row per visit
 *                      (the AMX block GEMM's order: its tiles load one line of
 *                      16 rows, and K blocks of C / 2 bfloat16)
 *   ... + prefetch     the same, with the next group's lines prefetched
 *                      (_MM_HINT_T0 or _MM_HINT_T1) over the current group's
 *
 * Build and run (any x86-64 CPU with AVX2; benchmarks/README.md, "AMX: the
 * weight stream"):
 *
 *   gcc -O2 -mavx2 -pthread benchmarks/read_patterns.c -o /tmp/read_patterns
 *   /tmp/read_patterns [threads]
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REGION ((size_t)512 << 20)
#define ROWS 256 /* rows per matrix */
#define GROUP 32 /* rows read side by side */

typedef struct {
    int kind;      /* 0 sequential, 1 rows */
    int hint;      /* 0 none, 1 T0, 2 T1 */
    size_t row, chunk;
} pattern;

typedef struct {
    const pattern *p;
    char *base;
    double gbs;
    long long sink;
} job;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static __m256i read_sequential(const char *p, size_t n, __m256i a)
{
    for (size_t i = 0; i < n; i += 256)
        for (int l = 0; l < 4; l++) {
            a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i + 64 * l)));
            a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i + 64 * l + 32)));
        }
    return a;
}

static void prefetch(const char *q, int hint)
{
    if (hint == 1)
        _mm_prefetch(q, _MM_HINT_T0);
    else
        _mm_prefetch(q, _MM_HINT_T1);
}

static __m256i read_rows(const pattern *pt, const char *p, size_t n, __m256i a)
{
    const size_t R = pt->row, C = pt->chunk, mat = ROWS * R, lines = C / 64;
    for (size_t b = 0; b + mat <= n; b += mat) {
        const char *m = p + b;
        for (size_t k0 = 0; k0 < R; k0 += C)
            for (size_t g = 0; g < ROWS; g += GROUP) {
                /* the next group: the next rows, or the next chunk's first rows */
                size_t gn = g + GROUP, kn = k0;
                const char *mn = m;
                if (gn >= ROWS) {
                    gn = 0;
                    kn = k0 + C;
                    if (kn >= R) {
                        kn = 0;
                        mn = m + mat;
                    }
                }
                const int pf = pt->hint != 0 && mn + mat <= p + n;
                size_t done = 0;
                for (size_t s = 0; s < lines; s++) {
                    const size_t upto = (s + 1) * GROUP; /* GROUP lines per step */
                    for (; pf && done < upto; done++)
                        prefetch(mn + (gn + done % GROUP) * R + kn + 64 * (done / GROUP), pt->hint);
                    for (size_t r = 0; r < GROUP; r++) {
                        const char *q = m + (g + r) * R + k0 + 64 * s;
                        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)q));
                        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(q + 32)));
                    }
                }
            }
    }
    return a;
}

static void *run(void *v)
{
    job *j = (job *)v;
    __m256i a = _mm256_setzero_si256();
    double best = 0;
    for (int pass = 0; pass < 5; pass++) {
        const double t0 = now();
        a = j->p->kind == 0 ? read_sequential(j->base, REGION, a) : read_rows(j->p, j->base, REGION, a);
        const double gbs = (double)REGION / (now() - t0) / 1e9;
        if (gbs > best)
            best = gbs;
    }
    j->gbs = best;
    j->sink = _mm256_extract_epi64(a, 0);
    return NULL;
}

static double measure(const pattern *p, char **regions, int threads, long long *sink)
{
    pthread_t th[64];
    job jobs[64];
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){p, regions[t], 0, 0};
        if (pthread_create(&th[t], NULL, run, &jobs[t]) != 0) {
            fprintf(stderr, "read_patterns: cannot start thread %d\n", t);
            exit(1);
        }
    }
    double sum = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        sum += jobs[t].gbs;
        *sink ^= jobs[t].sink;
    }
    return sum;
}

int main(int argc, char **argv)
{
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (threads < 1 || threads > 64) {
        fprintf(stderr, "read_patterns: threads must be 1-64, got %s\n", argv[1]);
        return 2;
    }
    char *regions[64];
    for (int t = 0; t < threads; t++) {
        regions[t] = aligned_alloc(4096, REGION);
        if (regions[t] == NULL) {
            fprintf(stderr, "read_patterns: cannot allocate %zu MiB for thread %d\n", REGION >> 20, t);
            return 1;
        }
        memset(regions[t], t + 1, REGION); /* pages mapped before timing */
    }
    const pattern pats[] = {
        {0, 0, 0, 0},
        {1, 0, 4096, 512}, {1, 0, 4096, 1024}, {1, 0, 4096, 4096},
        {1, 0, 8192, 1024}, {1, 0, 8192, 8192}, {1, 0, 2048, 2048},
        {1, 1, 4096, 1024}, {1, 2, 4096, 1024},
    };
    const char *hints[] = {"", " + prefetch T0", " + prefetch T1"};
    long long sink = 0;
    printf("| pattern | 1 thread GB/s | %d threads GB/s |\n|---|---|---|\n", threads);
    for (size_t i = 0; i < sizeof pats / sizeof pats[0]; i++) {
        const pattern *p = &pats[i];
        const double one = measure(p, regions, 1, &sink), all = measure(p, regions, threads, &sink);
        if (p->kind == 0)
            printf("| sequential | %.1f | %.1f |\n", one, all);
        else
            printf("| rows of %zu B side by side, %zu B per visit%s | %.1f | %.1f |\n", p->row, p->chunk,
                   hints[p->hint], one, all);
        fflush(stdout);
    }
    for (int t = 0; t < threads; t++)
        free(regions[t]);
    return sink == 42 ? 3 : 0; /* keeps the loads */
}

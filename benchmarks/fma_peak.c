/* The machine's float32 FMA rate with nothing but registers: the ceiling the
 * engine's kernels are measured against (benchmarks/README.md).
 *
 *     gcc -O2 -pthread benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak 2
 *
 * For each vector width the CPU has (AVX2 + FMA: 256-bit, AVX-512F: 512-bit),
 * 1 .. N threads (argument, default 2) each run independent FMA chains (enough
 * of them to cover the instruction latency on current cores) for 40 million
 * iterations (a fraction of a second); the best of 3 passes is printed in
 * GFLOP/s (2 flops per lane per FMA), per thread and in total.  No memory is
 * touched in the loop. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ITERS 40000000L
#define CHAINS256 12 /* AVX2 has 16 registers */
#define CHAINS512 24 /* AVX-512 has 32 */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* CHAINS256 chains of 8 lanes */
__attribute__((target("avx2,fma"))) static double run256(void)
{
    __m256 a[CHAINS256];
    const __m256 x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(-1e-7f);
    for (int i = 0; i < CHAINS256; i++)
        a[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 32 /* every chain, whatever CHAINS256 is */
        for (int i = 0; i < CHAINS256; i++)
            a[i] = _mm256_fmadd_ps(a[i], x, y);
    }
    float s = 0.0f, t[8];
    for (int i = 0; i < CHAINS256; i++) {
        _mm256_storeu_ps(t, a[i]);
        s += t[0];
    }
    return (double)s; /* keeps the chains alive */
}

/* CHAINS512 chains of 16 lanes */
__attribute__((target("avx512f"))) static double run512(void)
{
    __m512 a[CHAINS512];
    const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(-1e-7f);
    for (int i = 0; i < CHAINS512; i++)
        a[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 32 /* every chain */
        for (int i = 0; i < CHAINS512; i++)
            a[i] = _mm512_fmadd_ps(a[i], x, y);
    }
    float s = 0.0f;
    for (int i = 0; i < CHAINS512; i++)
        s += _mm512_reduce_add_ps(a[i]);
    return (double)s;
}

typedef struct {
    int wide;
    double seconds, sink;
} job;

static pthread_barrier_t start;

static void *worker(void *p)
{
    job *j = (job *)p;
    pthread_barrier_wait(&start);
    double t0 = now();
    j->sink = j->wide ? run512() : run256();
    j->seconds = now() - t0;
    return NULL;
}

static double rate(int wide, int threads)
{
    pthread_t th[64];
    job jobs[64];
    double best = 0.0;
    for (int pass = 0; pass < 3; pass++) {
        pthread_barrier_init(&start, NULL, (unsigned)threads);
        for (int t = 0; t < threads; t++) {
            jobs[t].wide = wide;
            pthread_create(&th[t], NULL, worker, &jobs[t]);
        }
        double slowest = 0.0;
        for (int t = 0; t < threads; t++) {
            pthread_join(th[t], NULL);
            if (jobs[t].seconds > slowest)
                slowest = jobs[t].seconds;
        }
        pthread_barrier_destroy(&start);
        const double flops = (double)ITERS * (wide ? CHAINS512 * 16 : CHAINS256 * 8) * 2.0 * threads;
        const double r = flops / slowest / 1e9;
        if (r > best)
            best = r;
    }
    return best;
}

int main(int argc, char **argv)
{
    char *end = NULL;
    const long max_threads = argc > 1 ? strtol(argv[1], &end, 10) : 2;
    if (argc > 1 && (end == argv[1] || *end != '\0' || max_threads < 1 || max_threads > 64)) {
        fprintf(stderr, "threads must be 1..64; got %s\n", argv[1]);
        return 2;
    }
    __builtin_cpu_init();
    const int has[2] = {__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                        __builtin_cpu_supports("avx512f")};
    const char *name[2] = {"AVX2 + FMA (256-bit)", "AVX-512F (512-bit)"};
    printf("| vector width | threads | GFLOP/s per thread | GFLOP/s total |\n|---|---|---|---|\n");
    for (int wide = 0; wide < 2; wide++) {
        if (!has[wide]) {
            printf("| %s | - | not on this CPU | |\n", name[wide]);
            continue;
        }
        for (int t = 1; t <= (int)max_threads; t++) {
            double r = rate(wide, t);
            printf("| %s | %d | %.1f | %.1f |\n", name[wide], t, r / t, r);
            fflush(stdout);
        }
    }
    return 0;
}

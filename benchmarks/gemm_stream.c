/* The AVX2 block GEMMs on one thread, with the weights in L2 and streamed
 * from memory: how much of the 16-128-row rate the weight stream costs.
 *
 *   gcc -O2 -Icsrc/core benchmarks/gemm_stream.c csrc/core/ds*.c -o /tmp/gemm_stream -lm -lpthread
 *   /tmp/gemm_stream [rounds]
 *
 * One call is what the engine's gate/up phase gives a block GEMM: mb x rows
 * against 256 weight rows (gate and up rows of 128 neurons interleaved, rows
 * 8 KiB apart, as in an OLMoE expert of H = 2048) over a K block of 256
 * float32 values, added to c.  "L2": every call reads the same 256 KiB;
 * "stream": each item's eight K blocks are read once from a 1 GiB buffer,
 * beyond the last-level cache of most machines; "stream, blocked": the same
 * bytes laid out as if packed once at load time, each call's 256 rows of one
 * K block one contiguous 256 KiB run (row j at j KiB), so that every call
 * reads one sequential stream instead of 1 KiB pieces 8 KiB apart.  Prints
 * the median GFLOP/s of the rounds and their range, for the packed GEMM
 * (gemm2) and the one that reads float32 weights in place (gemm3); the
 * engine's rule (csrc/core/ds_kernels_x86.c) picks between them by rows. */
#define _GNU_SOURCE
#include "ds_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define H 2048
#define KB 256
#define NW 256
#define CALLS 1024

int main(int argc, char **argv)
{
    const int rounds = argc > 1 ? atoi(argv[1]) : 9;
    if (rounds < 1 || rounds > 99) {
        fprintf(stderr, "rounds must be in [1, 99]\n");
        return 2;
    }
    ds_gemm_fn g[2];
    ds_gemm_avx2_variants(DS_F32, &g[0], &g[1]);
    if (g[0] == NULL || g[1] == NULL || ds_kernels_avx2(DS_F32) == NULL) {
        printf("the AVX2 kernels are not compiled in (not x86-64)\n");
        return 0;
    }
#if defined(__x86_64__) || defined(_M_X64)
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("this CPU has no AVX2 + FMA\n");
        return 0;
    }
#endif
    const int64_t item = (int64_t)NW * H, items = ((int64_t)1 << 28) / item; /* 1 GiB of float32 */
    float *big = aligned_alloc(64, (size_t)(items * item) * sizeof(float));
    float *x = aligned_alloc(64, (size_t)128 * H * sizeof(float));
    float *c = aligned_alloc(64, (size_t)128 * NW * sizeof(float));
    float *pack = aligned_alloc(64, (size_t)DS_GEMM_PACK_FLOATS * sizeof(float));
    if (!big || !x || !c || !pack) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (int64_t i = 0; i < items * item; i++)
        big[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (int64_t i = 0; i < 128 * H; i++)
        x[i] = (float)((i * 31) % 977) * 1e-3f - 0.5f;
    memset(c, 0, (size_t)128 * NW * sizeof(float));
    static const int rows[] = {16, 24, 32, 48, 64, 96, 128};
    printf("GFLOP/s, one thread, median [min-max] of %d rounds of %d calls\n", rounds, CALLS);
    printf("rows | gemm2 L2 | gemm2 stream | gemm2 stream, blocked | gemm3 L2 | gemm3 stream | gemm3 stream, blocked\n");
    int64_t next = 0;
    for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++) {
        const int mb = rows[ri];
        const void *xr[128];
        /* v: GEMM v / 3 (gemm2, gemm3); weights v % 3: 0 in L2, 1 streamed,
         * 2 streamed in the blocked layout */
        double med[6], lo[6], hi[6];
        for (int v = 0; v < 6; v++) {
            const int where = v % 3;
            double r[99];
            for (int rd = 0; rd < rounds; rd++) {
                double t0 = now();
                for (int call = 0; call < CALLS; call++) {
                    /* in L2: the first K block of one item (256 KiB) every call */
                    const int64_t k0 = where > 0 ? (int64_t)(call % (H / KB)) * KB : 0;
                    if (where > 0 && call % (H / KB) == 0)
                        next = (next + 37) % items; /* a new item: every K block of it once */
                    const float *w = big + (where > 0 ? next * item : 0);
                    const void *wr[NW];
                    for (int j = 0; j < NW; j++)
                        wr[j] = where == 2 ? w + k0 * NW + (int64_t)j * KB
                                           : w + k0 + (j & 1 ? (int64_t)(NW / 2) * H : 0) +
                                                 (int64_t)(j >> 1) * H;
                    for (int i = 0; i < mb; i++)
                        xr[i] = x + (int64_t)i * H + k0;
                    g[v / 3](mb, NW, xr, wr, KB, c, NW, call > 0, pack);
                }
                r[rd] = 2.0 * mb * NW * KB * CALLS / (now() - t0) * 1e-9;
            }
            qsort(r, (size_t)rounds, sizeof r[0], cmp);
            med[v] = r[rounds / 2];
            lo[v] = r[0];
            hi[v] = r[rounds - 1];
        }
        printf("%4d", mb);
        for (int v = 0; v < 6; v++)
            printf(" | %6.1f [%5.1f-%5.1f]", med[v], lo[v], hi[v]);
        printf("\n");
    }
    free(big);
    free(x);
    free(c);
    free(pack);
    return 0;
}

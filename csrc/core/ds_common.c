/* Errors, dtypes, half-precision conversions, CPU feature detection. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall() */
#endif
#include "ds_internal.h"

#include <stdatomic.h>

#include <stdarg.h>
#include <stdio.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#if defined(_MSC_VER)
#define DS_THREAD_LOCAL __declspec(thread)
#else
#define DS_THREAD_LOCAL _Thread_local
#endif

static DS_THREAD_LOCAL char ds_errmsg[512];

const char *ds_last_error(void) { return ds_errmsg; }

ds_status ds_error(ds_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ds_errmsg, sizeof ds_errmsg, fmt, ap);
    va_end(ap);
    return code;
}

static const char *const ds_dtype_names[DS_DTYPE_COUNT] = {
    "float32", "bfloat16", "float16", "float64", "int8", "uint8", "int16", "int32", "int64"};
static const size_t ds_dtype_sizes[DS_DTYPE_COUNT] = {4, 2, 2, 8, 1, 1, 2, 4, 8};

const char *ds_dtype_name(ds_dtype dt)
{
    return ((unsigned)dt < DS_DTYPE_COUNT) ? ds_dtype_names[dt] : "unknown";
}

size_t ds_dtype_size(ds_dtype dt)
{
    return ((unsigned)dt < DS_DTYPE_COUNT) ? ds_dtype_sizes[dt] : 0;
}

/* IEEE binary16 <-> binary32, exact in the widening direction, round to
 * nearest even in the narrowing one. */
float ds_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while ((man & 0x400u) == 0);
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t ds_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    if (abs >= 0x477ff000u) /* rounds to infinity (>= 65520) */
        return (uint16_t)(sign | 0x7c00u);
    if (abs >= 0x38800000u) { /* normal half */
        uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    if (abs < 0x33000000u) /* below half the smallest subnormal */
        return (uint16_t)sign;
    /* subnormal half: shift the full significand into place, round half even */
    uint32_t e = abs >> 23;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14 .. 24 */
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

float ds_silu(float g) { return g / (1.0f + expf(-g)); }

void ds_importance_epilogue(const float *gu, int64_t n, double c, double *acc, int64_t stride)
{
    for (int64_t j = 0; j < n; j++) {
        double a = gu[2 * j], b = gu[2 * j + 1];
        double s = (double)ds_silu((float)a);
        double sb = s * b;
        acc[j] += c * s;
        acc[stride + j] += c * fabs(s);
        acc[2 * stride + j] += c * sb;
        acc[3 * stride + j] += c * fabs(sb);
    }
}

/* ---- SIMD level ---------------------------------------------------------- */
static int ds_simd_current = -1;

static int ds_cpu_has(ds_simd_level level);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* AMX-TILE and AMX-BF16 (CPUID.(EAX=7, ECX=0):EDX bits 24 and 22), the
 * tile state enabled by the OS (XCR0 bits 17, 18), and this process's
 * permission to use it, which Linux grants on request (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; inherited by threads and
 * forked children).  Asked once; 0 where any step fails. */
static int ds_amx_probe(void)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!ds_cpu_has(DS_SIMD_AVX512_BF16) || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u))
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) /* OSXSAVE */
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17))
        return 0;
#if defined(__linux__)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}
static atomic_int ds_amx_state = -1;
static int ds_amx_usable(void)
{
    int st = atomic_load(&ds_amx_state);
    if (st < 0) {
        st = ds_amx_probe();
        atomic_store(&ds_amx_state, st);
    }
    return st;
}
#endif

static int ds_cpu_has(ds_simd_level level)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    switch (level) {
    case DS_SIMD_GENERIC: return 1;
    case DS_SIMD_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case DS_SIMD_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case DS_SIMD_AVX512_BF16:
    {
        /* CPUID.(EAX=7, ECX=1):EAX bit 5; the OS's AVX-512 state support is
         * covered by the avx512f test above. */
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!ds_cpu_has(DS_SIMD_AVX512) || !__get_cpuid_count(7, 1, &a, &b, &c, &d))
            return 0;
        return (a >> 5) & 1u;
    }
    case DS_SIMD_AMX_BF16:
        return ds_amx_usable();
    }
    return 0;
#else
    return level == DS_SIMD_GENERIC;
#endif
}

int ds_simd_compiled(ds_simd_level level)
{
    switch (level) {
    case DS_SIMD_GENERIC: return 1;
    case DS_SIMD_AVX2: return ds_kernels_avx2(DS_F32) != NULL;
    case DS_SIMD_AVX512: return ds_kernels_avx512(DS_F32) != NULL;
    case DS_SIMD_AVX512_BF16: return ds_kernels_avx512_bf16(DS_BF16) != NULL;
    case DS_SIMD_AMX_BF16: return ds_kernels_amx_bf16(DS_BF16) != NULL;
    }
    return 0;
}

ds_simd_level ds_simd_detected(void)
{
    for (int l = DS_SIMD_AMX_BF16; l > DS_SIMD_GENERIC; l--)
        if (ds_simd_compiled((ds_simd_level)l) && ds_cpu_has((ds_simd_level)l))
            return (ds_simd_level)l;
    return DS_SIMD_GENERIC;
}

ds_simd_level ds_simd_active(void)
{
    if (ds_simd_current < 0)
        ds_simd_current = (int)ds_simd_detected();
    return (ds_simd_level)ds_simd_current;
}

ds_status ds_simd_set(ds_simd_level level)
{
    if ((int)level < DS_SIMD_GENERIC || (int)level > DS_SIMD_AMX_BF16)
        return ds_error(DS_ERR_VALUE, "simd level %d is not a known level", (int)level);
    if ((int)level > (int)ds_simd_detected())
        return ds_error(DS_ERR_UNSUPPORTED,
                        "simd level %s is not available here (best is %s)",
                        ds_simd_name(level), ds_simd_name(ds_simd_detected()));
    ds_simd_current = (int)level;
    return DS_OK;
}

/* atomic: a thread may switch it while another starts a call */
static atomic_int ds_block_gemm_on = 1;

static atomic_int ds_rows_four_on = -1; /* -1: not chosen yet */

static int ds_cpu_is_intel(void)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    unsigned a = 0, b = 0, c = 0, d = 0;
    /* "GenuineIntel" in EBX, EDX, ECX */
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;
#else
    return 0;
#endif
}

void ds_rows_four_set(int rule)
{
    atomic_store_explicit(&ds_rows_four_on, rule < 0 ? ds_cpu_is_intel() : rule != 0, memory_order_relaxed);
}

int ds_rows_four_rule(void)
{
    int r = atomic_load_explicit(&ds_rows_four_on, memory_order_relaxed);
    if (r < 0) {
        r = ds_cpu_is_intel();
        atomic_store_explicit(&ds_rows_four_on, r, memory_order_relaxed);
    }
    return r;
}

void ds_block_gemm_set(int on) { atomic_store_explicit(&ds_block_gemm_on, on != 0, memory_order_relaxed); }

int ds_block_gemm_enabled(void) { return atomic_load_explicit(&ds_block_gemm_on, memory_order_relaxed); }

const char *ds_simd_name(ds_simd_level level)
{
    switch (level) {
    case DS_SIMD_GENERIC: return "generic";
    case DS_SIMD_AVX2: return "avx2";
    case DS_SIMD_AVX512: return "avx512";
    case DS_SIMD_AVX512_BF16: return "avx512_bf16";
    case DS_SIMD_AMX_BF16: return "amx_bf16";
    }
    return "unknown";
}

const ds_kernels *ds_kernels_get(ds_dtype dt)
{
    /* The best compiled kernel at or below the active level: the bf16 level
     * only adds a bfloat16 kernel, the others cover every dtype. */
    const ds_simd_level level = ds_simd_active();
    const ds_kernels *k = NULL;
    if (level >= DS_SIMD_AMX_BF16)
        k = ds_kernels_amx_bf16(dt);
    if (k == NULL && level >= DS_SIMD_AVX512_BF16)
        k = ds_kernels_avx512_bf16(dt);
    if (k == NULL && level >= DS_SIMD_AVX512)
        k = ds_kernels_avx512(dt);
    if (k == NULL && level >= DS_SIMD_AVX2)
        k = ds_kernels_avx2(dt);
    if (k == NULL)
        k = ds_kernels_generic(dt);
    return k;
}

/* A small persistent thread pool.
 *
 * ds_parallel_for hands items [0, n) to the calling thread plus up to
 * n_threads - 1 workers through one atomic counter.  Which thread runs an
 * item never changes what the item computes, so results do not depend on the
 * thread count.  One job runs at a time; a second caller arriving while the
 * pool is busy (another Python thread with the GIL released) runs its items
 * on its own thread instead of waiting.  After fork() the child starts with
 * an empty pool.
 *
 * A worker that has finished a job, and the caller waiting for the workers,
 * first poll for up to DS_POOL_SPIN_US microseconds before they sleep on the
 * condition variable: one call of the engine is three jobs in a row (gate/up,
 * down, combine) and a model's layers call it back to back, so the next job
 * usually comes within that time, and a sleeping thread is woken late
 * (tens to hundreds of microseconds, on virtual machines more), while the
 * thread that posted the job runs its items alone. */
#define _POSIX_C_SOURCE 200809L
#include "ds_internal.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#define DS_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define DS_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define DS_CPU_RELAX() ((void)0)
#endif

#define DS_POOL_MAX 256
#ifndef DS_POOL_SPIN_US
#define DS_POOL_SPIN_US 100 /* 0: sleep at once (the build before the polling) */
#endif

typedef struct {
    pthread_mutex_t busy;   /* held by the thread that owns the current job */
    pthread_mutex_t mu;     /* protects the fields below */
    pthread_cond_t wake, done;
    int n_workers;
    pthread_t threads[DS_POOL_MAX];
    atomic_ullong generation; /* written under mu; polled without it */
    int participants;       /* workers asked to join the current job */
    atomic_int finished;    /* workers that finished it (written under mu) */
    ds_item_fn fn;
    void *ctx;
    int64_t n_items;
    atomic_llong next;
} ds_pool_t;

static ds_pool_t pool = {.busy = PTHREAD_MUTEX_INITIALIZER,
                         .mu = PTHREAD_MUTEX_INITIALIZER,
                         .wake = PTHREAD_COND_INITIALIZER,
                         .done = PTHREAD_COND_INITIALIZER};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

int ds_max_threads(void) { return DS_POOL_MAX; }

static void run_items(ds_item_fn fn, void *ctx, int64_t n, atomic_llong *next, int tid)
{
    for (;;) {
        int64_t i = (int64_t)atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (i >= n)
            break;
        fn(ctx, i, tid);
    }
}

static int64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + (int64_t)t.tv_nsec;
}

/* Polls ready(arg) for up to DS_POOL_SPIN_US; 1 once it holds, 0 if time ran out. */
static int poll_for(int (*ready)(const void *), const void *arg)
{
    if (DS_POOL_SPIN_US <= 0)
        return 0;
    const int64_t end = mono_ns() + (int64_t)DS_POOL_SPIN_US * 1000;
    do {
        for (int i = 0; i < 16; i++) {
            if (ready(arg))
                return 1;
            DS_CPU_RELAX();
        }
    } while (mono_ns() < end);
    return 0;
}

static int new_job(const void *seen)
{
    return atomic_load_explicit(&pool.generation, memory_order_acquire) !=
           *(const unsigned long long *)seen;
}

static int all_finished(const void *want)
{
    return atomic_load_explicit(&pool.finished, memory_order_acquire) >= *(const int *)want;
}

static void *worker_main(void *arg)
{
    int index = (int)(intptr_t)arg; /* 1-based */
    unsigned long long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_unlock(&pool.mu);
            poll_for(new_job, &seen);
            pthread_mutex_lock(&pool.mu);
        }
        while (atomic_load(&pool.generation) == seen)
            pthread_cond_wait(&pool.wake, &pool.mu);
        seen = atomic_load(&pool.generation);
        if (index > pool.participants)
            continue;
        ds_item_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int64_t n = pool.n_items;
        pthread_mutex_unlock(&pool.mu);
        run_items(fn, ctx, n, &pool.next, index);
        pthread_mutex_lock(&pool.mu);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == pool.participants)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void pool_after_fork_child(void)
{
    /* The workers do not exist in the child: forget them. */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.generation, 0);
    pool.participants = 0;
    atomic_store(&pool.finished, 0);
}

static void pool_register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

/* Called with pool.mu held. Workers inherit a mask that blocks every signal,
 * so signals keep going to the threads that expect them. */
static int pool_grow(int want)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.n_workers < want) {
        int index = pool.n_workers + 1;
        if (pthread_create(&pool.threads[pool.n_workers], NULL, worker_main,
                           (void *)(intptr_t)index) != 0)
            break;
        pthread_detach(pool.threads[pool.n_workers]);
        pool.n_workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.n_workers;
}

ds_status ds_parallel_for(int n_threads, int64_t n_items, ds_item_fn fn, void *ctx)
{
    if (n_threads < 1 || n_threads > DS_POOL_MAX)
        return ds_error(DS_ERR_VALUE, "num_threads must be in [1, %d]; got %d", DS_POOL_MAX,
                        n_threads);
    if (n_items <= 0)
        return DS_OK;
    int helpers = n_threads - 1;
    if ((int64_t)helpers > n_items - 1)
        helpers = (int)(n_items - 1);
    if (helpers == 0 || pthread_mutex_trylock(&pool.busy) != 0) {
        atomic_llong next = 0;
        run_items(fn, ctx, n_items, &next, 0);
        return DS_OK;
    }
    pthread_once(&pool_once, pool_register_fork);
    pthread_mutex_lock(&pool.mu);
    helpers = pool_grow(helpers) < helpers ? pool.n_workers : helpers;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_items = n_items;
    atomic_store(&pool.next, 0);
    pool.participants = helpers;
    atomic_store(&pool.finished, 0);
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);

    run_items(fn, ctx, n_items, &pool.next, 0);

    poll_for(all_finished, &helpers);
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.finished) < pool.participants)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.busy);
    return DS_OK;
}

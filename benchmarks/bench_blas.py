#!/usr/bin/env python
"""Side-by-side fp32 GEMM kernels on the engine's GEMM shapes.

C = X W^T with X: m x K and W: n x K, both K-contiguous (the layout of an
expert's gate/up weights), for m in 1, 4, 16, 64, 256 and (n, K) in
(2048, 2048), (4096, 4096):

* ``torch.matmul``        torch.matmul(X, W.t()) (MKL sgemm in the PyPI CPU build)
* ``numpy``               X @ W.T (numpy's bundled OpenBLAS, core auto-detected)
* ``openblas32``          scipy_openblas32's cblas_sgemm via ctypes, core auto-detected
* ``openblas32_skx``      the same library forced to OPENBLAS_CORETYPE=SkylakeX (AVX-512):
                          a second copy of the .so is loaded so both instances coexist
                          (OpenBLAS reads the variable once, when it loads)
* ``engine``              dualsparse.ops.moe_experts with E=1, K=1: gate_up = W viewed as
                          (1, n, K), i.e. I = n/2 neurons, plus a down projection
                          (1, K, n/2).  Approximate: the call also runs SwiGLU and the down
                          projection, so its rate is counted as 3*m*n*K flops / time (the
                          down GEMM is half the gate_up GEMM) and includes their overheads.

Weights rotate over enough copies (>= --rotate-mb) that every call reads W
from DRAM, as a model's experts do.  Rates are GFLOP/s (2*m*n*K / time, median
of all calls); for small m the W read rate (GB/s) is what bounds them.  The
implementations are timed in interleaved rounds (random order, an idle gap
before each, ~50 ms bursts of calls), so a drift of the machine's speed hits
all alike.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_openblas(coretype: str | None = None, threads: int = 2, thread_timeout: int | None = None):
    """scipy_openblas32 through ctypes; with ``coretype`` a private copy of the
    library is loaded with OPENBLAS_CORETYPE set (so it can sit next to an
    auto-detected instance); ``thread_timeout`` (log2 cycles, 4..30) sets
    OPENBLAS_THREAD_TIMEOUT for that copy, i.e. how long its idle worker
    threads spin after a call (default 28: ~0.1 s, which slows whatever runs
    next on a 2-core machine).  Returns (sgemm(X, W) -> C = X @ W.T, corename)
    or (None, reason)."""
    try:
        import scipy_openblas32 as sob
    except ImportError:
        return None, "scipy-openblas32 not installed (pip install scipy-openblas32)"
    import numpy as np

    src = os.path.join(sob.get_lib_dir(), "libscipy_openblas.so")
    if not os.path.exists(src):
        cands = [f for f in os.listdir(sob.get_lib_dir()) if f.endswith(".so") or ".so." in f]
        if not cands:
            return None, f"no shared library in {sob.get_lib_dir()}"
        src = os.path.join(sob.get_lib_dir(), cands[0])
    path = src
    env = {}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    if thread_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = str(int(thread_timeout))
    if env:
        # a private copy ignores openblas_set_num_threads (measured with
        # scipy-openblas32 0.3.34: it keeps the thread count it was loaded
        # with), so the count is set at load as well
        env["OPENBLAS_NUM_THREADS"] = str(int(threads))
    saved = {k: os.environ.get(k) for k in env}
    if env:  # a private copy per setting, so that these apply to a fresh instance
        d = tempfile.mkdtemp(prefix="ds_openblas_")
        path = os.path.join(d, f"libscipy_openblas_{coretype or 'auto'}_{thread_timeout or 'dflt'}_{threads}t.so")
        shutil.copy(src, path)
        os.environ.update(env)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if path != src:  # the loaded copy stays mapped; its 25 MB file need not outlive the call
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    prefix = "scipy_"
    lib[f"{prefix}openblas_set_num_threads"](threads)
    got = lib[f"{prefix}openblas_get_num_threads"]()
    if got != threads:
        return None, f"scipy_openblas32 runs {got} threads where {threads} were asked for"
    try:
        fn = lib[f"{prefix}openblas_get_corename"]
        fn.restype = ctypes.c_char_p
        core = fn().decode()
    except (AttributeError, OSError):
        core = "?"
    sg = lib[f"{prefix}cblas_sgemm"]
    P = ctypes.c_void_p
    sg.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P, ctypes.c_int, ctypes.c_float, P, ctypes.c_int]
    sg.restype = None
    CblasRowMajor, CblasNoTrans, CblasTrans = 101, 111, 112

    def sgemm(X, W, C=None):
        m, K = X.shape
        n = W.shape[0]
        assert X.dtype == np.float32 and W.dtype == np.float32 and X.flags.c_contiguous and W.flags.c_contiguous
        if C is None:
            C = np.empty((m, n), dtype=np.float32)
        sg(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, K, 1.0, X.ctypes.data, K, W.ctypes.data, K, 0.0,
           C.ctypes.data, n)
        return C

    sgemm._lib = lib  # keep the library alive
    return sgemm, core


def interleaved_medians(fns, n_calls, budget, gap, rng, idle_threshold=0.10, min_rounds=5, max_rounds=50,
                        noisy_budget=30.0):
    """Median seconds per call of every fn(i) (i rotating over n_calls weight
    copies).  After a warm-up, rounds run every implementation in a fresh
    random order, each after `gap` idle seconds (OpenBLAS's workers spin for
    ~0.1 s after a call and would slow the next library) and for a burst of
    about 50 ms of back-to-back calls (a library's own spinning threads help it
    there, as in a model's loop of calls); rounds go on for `budget` seconds
    per implementation (at least min_rounds, at most max_rounds), so a drift of
    the machine's speed hits all alike.  Rounds during which other processes
    used more than `idle_threshold` of the CPUs are discarded while enough
    quiet ones come (a busy core turns OpenBLAS's 1 ms GEMV into 50 ms)."""
    from bench_experts import cpu_snapshot, other_load

    names = list(fns)
    burst = {}
    for name in names:
        for i in range(3):
            fns[name](i % n_calls)
        t0 = time.perf_counter()
        fns[name](3 % n_calls)
        burst[name] = max(1, min(200, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    all_rounds = []  # (other load, {name: [seconds per call]})
    t_all = time.perf_counter()
    k = 0
    while True:
        s0 = cpu_snapshot()
        ts = {}
        for j in rng.permutation(len(names)):
            name = names[j]
            time.sleep(gap)
            ts[name] = []
            for _ in range(burst[name]):
                t0 = time.perf_counter()
                fns[name](k % n_calls)
                ts[name].append(time.perf_counter() - t0)
                k += 1
        all_rounds.append((other_load(s0, cpu_snapshot()), ts))
        quiet = [r for r in all_rounds if r[0] <= idle_threshold]
        el = time.perf_counter() - t_all
        if len(quiet) >= max_rounds or len(all_rounds) >= 3 * max_rounds:
            break
        if len(quiet) >= min_rounds and el >= budget * len(names):
            break
        if len(all_rounds) >= min_rounds and el >= budget * len(names) + noisy_budget:
            break
    used = quiet if len(quiet) >= min_rounds else sorted(all_rounds, key=lambda r: r[0])[:min_rounds]
    out = {}
    for name in names:
        v = [t for r in used for t in r[1][name]]
        out[name] = (statistics.median(v), len(v))
    load = sum(r[0] for r in used) / len(used)
    return out, len(used), len(all_rounds), load


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--shapes", nargs="+", default=["2048x2048", "4096x4096"], help="n x K")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rotate-mb", type=float, default=256.0, help="weight copies rotated per case (MB)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timed rounds per implementation and case (default 1)")
    p.add_argument("--gap", type=float, default=0.3,
                   help="idle seconds before each implementation (OpenBLAS workers spin ~0.1 s after a call)")
    p.add_argument("--idle-threshold", type=float, default=0.10,
                   help="rounds where other processes use more of the CPUs are discarded (default 0.10)")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"))
    p.add_argument("--quick", action="store_true", help="m in 1, 64; n x K 2048x2048 only")
    a = p.parse_args(argv)
    if a.quick:
        a.ms, a.shapes, a.budget = [1, 64], ["2048x2048"], 0.3

    import numpy as np
    import torch

    try:
        from dualsparse import ops
    except ImportError:
        sys.path.insert(0, REPO)
        from dualsparse import ops

    torch.set_num_threads(a.threads)
    libs = {}
    for name, ct in (("openblas32", None), ("openblas32_skx", "SkylakeX")):
        fn, core = load_openblas(ct, a.threads)
        if fn is None:
            print(f"{name}: unavailable ({core})")
        else:
            libs[name] = fn
            print(f"{name}: OpenBLAS core {core}")
    print(f"torch {torch.__version__} ({a.threads} threads), numpy {np.__version__}, engine SIMD {ops.simd_level()}")

    impls = ["torch.matmul", "numpy"] + list(libs) + ["engine"]
    results = []
    rng = np.random.default_rng(0)
    order_rng = np.random.default_rng(1)
    for shape in a.shapes:
        n, K = map(int, shape.lower().split("x"))
        wbytes = n * K * 4
        ncopy = max(1, int(a.rotate_mb * 2**20 // wbytes))
        # allocated by torch (64-byte aligned, as a model's weights are): a NumPy
        # array of this size starts 16 bytes into a cache line, which splits
        # every 64-byte load of the engine's AVX-512 kernels (measured 10-16%
        # slower at MoE shapes; the packing BLAS libraries do not see it)
        gen = torch.Generator().manual_seed(n * 131 + K)
        Ws = [torch.randn(n, K, generator=gen) / K ** 0.5 for _ in range(ncopy)]
        Wn = [w.numpy() for w in Ws]
        # engine: gate_up = W as (1, n, K) (I = n/2), down (1, K, n/2)
        downs = [torch.randn(1, K, n // 2, generator=gen) / (n // 2) ** 0.5 for _ in range(ncopy)]
        ids1 = None
        for m in a.ms:
            X = torch.from_numpy(rng.standard_normal((m, K), dtype=np.float32))
            Xn = X.numpy()
            Cn = np.empty((m, n), dtype=np.float32)
            ids1 = torch.zeros(m, 1, dtype=torch.int64)
            w1 = torch.ones(m, 1)
            out = torch.empty(m, K)
            fns = {
                "torch.matmul": lambda i: torch.matmul(X, Ws[i].t()),
                "numpy": lambda i: Xn @ Wn[i].T,
                "engine": lambda i: ops.moe_experts(X, ids1, w1, Ws[i].view(1, n, K), downs[i], out=out,
                                                    num_threads=a.threads),
            }
            for name, fn in libs.items():
                fns[name] = (lambda f: (lambda i: f(Xn, Wn[i], Cn)))(fn)
            # correctness of the BLAS paths against torch
            ref = torch.matmul(X, Ws[0].t()).numpy()
            for name in libs:
                c = fns[name](0)
                err = float(np.abs(c - ref).max() / (np.abs(ref).max() + 1e-30))
                if err > 1e-4:
                    print(f"WARNING {name} m={m} {shape}: max rel err {err:.2e}")
            row = {"m": m, "n": n, "K": K}
            meds, rounds, rounds_total, load = interleaved_medians(fns, ncopy, a.budget, a.gap, order_rng,
                                                                   idle_threshold=a.idle_threshold)
            for name in impls:
                t, reps = meds[name]
                flops = (3 if name == "engine" else 2) * m * n * K
                wb = wbytes * (1.5 if name == "engine" else 1)
                row[name] = {"ms": t * 1e3, "gflops": flops / t / 1e9, "w_gbps": wb / t / 1e9, "repeats": reps}
            row["rounds"], row["rounds_total"], row["bg_load"] = rounds, rounds_total, load
            results.append(row)
            best = max(impls, key=lambda k: row[k]["gflops"])
            print(f"n x K = {n} x {K}, m = {m:>3}: " + "  ".join(
                f"{k} {row[k]['gflops']:7.1f}" for k in impls) + f"   GFLOP/s (best: {best}; "
                f"{rounds}/{rounds_total} rounds, bg load {load:.0%})", flush=True)
        del Ws, Wn, downs

    lines = ["| n x K | m | " + " | ".join(impls) + " | best | bg load |", "|" + "---|" * (len(impls) + 4)]
    for r in results:
        best = max(impls, key=lambda k: r[k]["gflops"])
        lines.append(f"| {r['n']}x{r['K']} | {r['m']} | " + " | ".join(
            f"{r[k]['gflops']:.1f} ({r[k]['w_gbps']:.0f} GB/s)" for k in impls) + f" | {best} | {r['bg_load']:.0%} |")
    md = ("fp32 GFLOP/s (weight read rate in GB/s); engine = moe_experts E=1,K=1, counted as 3mnK flops "
          "(gate_up + down; approximate)\n\n" + "\n".join(lines) + "\n")
    print()
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_blas.json"), "w") as f:
        json.dump({"torch": torch.__version__, "numpy": np.__version__, "simd": ops.simd_level(),
                   "threads": a.threads, "results": results}, f, indent=1)
    with open(os.path.join(a.out, "bench_blas.md"), "w") as f:
        f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""CPU benchmark of the dualsparse engine's routed experts against Hugging Face
transformers, at no drop and under 1T-/2T-Drop, with the machine's own limits.

One run measures, for each model shape (OLMoE-1B-7B, Mixtral-8x7B), dtype
(float32, bfloat16) and token count T, every implementation side by side in
the same process, interleaved round by round so machine noise hits all alike:

* transformers 5.x (the generation installed decides what runs):
  - ``engine``          dualsparse.ops.moe_experts on the fused (E, 2I, H) / (E, H, I) tensors
  - ``engine_after_torch``  the same, each call right after an untimed torch GEMM the size of
                        the attention output projection (torch's OpenMP workers still spin)
  - ``hf5_eager``       the Experts class' own forward (MixtralExperts / OlmoeExperts)
  - ``hf5_grouped_mm``  transformers.integrations.moe.grouped_mm_experts_forward
  - ``hf5_batched_mm``  transformers.integrations.moe.batched_mm_experts_forward
                        (copies one expert per (token, expert) pair: skipped when
                        that copy would exceed --max-extra-gb)
* transformers 4.57.x:
  - ``engine``          as above (the anchor that ties the two runs together)
  - ``engine_split``    dualsparse.ops.moe_experts_split on the per-expert nn.Linear weights
  - ``hf4_loop``        the per-expert loop of MixtralSparseMoeBlock / OlmoeSparseMoeBlock:
                        the block's forward *after routing*, replicated line by line and run
                        on the block's own expert modules (the router is not timed)
* engine drop policies (both generations): 1T-Drop and 2T-Drop (P=2) at drop
  rates r in --rates, plus route_levels' own time.
* in every timed round, a short GEMM-rate and read-bandwidth probe: efficiencies
  are judged against the machine's speed while that shape ran.

All implementations read the same weight storage (the HF modules' parameters
are views of the tensors the engine reads), so the same bytes are touched.
Results: JSON + CSV + a markdown table per run; ``--merge`` joins the JSON of
a transformers-5 and a transformers-4 run into one table.  See README.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    # raw softmax top-8 weights (norm_topk_prob=False)
    "olmoe": dict(model="OLMoE-1B-7B", H=2048, I=1024, E=64, K=8, renorm=False),
    # renormalised top-2
    "mixtral": dict(model="Mixtral-8x7B", H=4096, I=14336, E=8, K=2, renorm=True),
}
DTYPES = ("float32", "bfloat16")
RATES = (0.1, 0.25, 0.5)
TOKENS = (1, 16, 128, 512)
# Hub-loaded CUDA kernels registered in transformers' ExpertsInterface: not CPU implementations.
HF_CUDA_ONLY = ("deepgemm", "sonicmoe")


# ----------------------------------------------------------------- helpers

def log(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)
    sys.stdout.flush()


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="cfg", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        class _P:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"[{desc}] {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _P()


def import_engine():
    """dualsparse from the installed package, or from this checkout (the
    transformers-4 virtualenv has no install: the in-place .so is used)."""
    try:
        import dualsparse  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO)
        import dualsparse  # noqa: F401
    from dualsparse import ops

    return sys.modules["dualsparse"], ops


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def timeit(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def git_state():
    def run(*a):
        try:
            return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # pragma: no cover
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty_files": [l[3:] for l in run("status", "--porcelain").splitlines()]}


def file_digest(path):
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"path": path, "sha256": h.hexdigest()[:16],
                "mtime": _dt.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")}
    except OSError:
        return {"path": path}


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # pragma: no cover
        pass
    return platform.processor()


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def cpu_snapshot():
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime


def other_load(s0, s1):
    """Share of the machine's CPUs used by *other* processes (and the
    hypervisor's steal) between two snapshots: 0 = quiet, 1 = all cores busy."""
    wall = s1[0] - s0[0]
    if wall <= 0:
        return float("nan")
    other = (s1[1] - s0[1]) - (s1[2] - s0[2])
    return max(0.0, other / (wall * (os.cpu_count() or 1)))


def wait_idle(max_wait: float, threshold: float, log_fn=log):
    """Waits (up to max_wait seconds) until other processes use less than
    `threshold` of the CPUs over a 1-second window; returns the last load."""
    if max_wait <= 0:
        return None
    t_end = time.perf_counter() + max_wait
    said = False
    while True:
        s0 = cpu_snapshot()
        time.sleep(1.0)
        load = other_load(s0, cpu_snapshot())
        if load < threshold or time.perf_counter() >= t_end:
            if said:
                log_fn(f"   machine {'quiet' if load < threshold else 'still busy'} (other load {load:.2f})")
            return load
        if not said:
            log_fn(f"   waiting for the machine to go quiet (other processes use {load:.0%} of the CPUs)...")
            said = True


# ----------------------------------------------------------- machine limits

def machine_limits(torch, np, quick: bool, log_fn=log, dtypes=("float32", "bfloat16")):
    """GEMM rate per dtype (best of torch.matmul and numpy/OpenBLAS on large
    square shapes) and memory read bandwidth (best of full reductions and a
    big GEMV over ~1 GiB); only the dtypes benchmarked (torch's bfloat16
    matmul held to AVX2 is a slow single-threaded loop)."""
    reps = 3 if quick else 7
    res = {"gemm": [], "bandwidth": []}
    handles = {}
    sizes = [2048] if quick else [2048, 4096]
    for dt in dtypes:
        for n in sizes:
            a = torch.randn(n, n).to(getattr(torch, dt))
            b = torch.randn(n, n).to(getattr(torch, dt))
            t0 = time.perf_counter()
            torch.matmul(a, b)
            first = time.perf_counter() - t0
            # a matmul that takes seconds (torch's bfloat16 fallback loop when held
            # to AVX2) is timed once, and larger sizes are not tried
            t = first if first > 2.0 else timeit(lambda: torch.matmul(a, b), reps, warmup=0)
            res["gemm"].append({"lib": "torch.matmul", "dtype": dt, "shape": f"{n}x{n}x{n}", "gflops": 2 * n**3 / t / 1e9})
            del a, b
            if first > 2.0:
                break
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
        t = timeit(lambda: a @ b, reps)
        res["gemm"].append({"lib": "numpy.matmul (OpenBLAS)", "dtype": "float32", "shape": f"{n}x{n}x{n}", "gflops": 2 * n**3 / t / 1e9})
        del a, b
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_blas import load_openblas
    except ImportError:  # pragma: no cover
        load_openblas = None
    if load_openblas is not None:
        held = os.environ.get("OPENBLAS_CORETYPE") == "Haswell"
        for coretype in (None,) if held else (None, "SkylakeX"):
            sg, core = load_openblas(coretype, torch.get_num_threads(), thread_timeout=4)
            if sg is None:
                log_fn(f"  (scipy_openblas32 unavailable: {core})")
                break
            for n in sizes:
                a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
                b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
                c = np.empty((n, n), dtype=np.float32)
                t = timeit(lambda: sg(a, b, c), reps)
                res["gemm"].append({"lib": f"scipy_openblas32 sgemm ({core})", "dtype": "float32",
                                    "shape": f"{n}x{n}x{n}", "gflops": 2 * n**3 / t / 1e9})
                del a, b, c
            handles[f"openblas_{coretype or 'auto'}"] = sg
    nbytes = (2**28 if quick else 2**30)
    x = torch.randn(nbytes // 4)
    res["bandwidth"].append({"method": "torch.sum fp32", "gbps": nbytes / timeit(lambda: x.sum(), reps) / 1e9})
    res["bandwidth"].append({"method": "torch.amax fp32", "gbps": nbytes / timeit(lambda: x.amax(), reps) / 1e9})
    xn = x.numpy()
    res["bandwidth"].append({"method": "numpy.sum fp32 (1 thread)", "gbps": nbytes / timeit(lambda: xn.sum(), reps) / 1e9})
    rows = int(math.isqrt(nbytes // 4))
    A = x[: rows * rows].view(rows, rows)
    v = torch.randn(rows)
    res["bandwidth"].append({"method": "torch.mv fp32 GEMV", "gbps": rows * rows * 4 / timeit(lambda: torch.mv(A, v), reps) / 1e9})
    del x, xn, A
    Ab = torch.randn(rows, rows * 2).bfloat16()
    vb = torch.randn(1, rows * 2).bfloat16()
    res["bandwidth"].append({"method": "F.linear bf16 GEMV", "gbps": rows * rows * 4 / timeit(lambda: torch.nn.functional.linear(vb, Ab), reps) / 1e9})
    del Ab
    gc.collect()
    best_gemm = {}
    for g in res["gemm"]:
        if g["gflops"] > best_gemm.get(g["dtype"], {"gflops": 0})["gflops"]:
            best_gemm[g["dtype"]] = g
    res["gemm_rate_gflops"] = {dt: g["gflops"] for dt, g in best_gemm.items()}
    res["gemm_rate_source"] = {dt: f'{g["lib"]} {g["shape"]}' for dt, g in best_gemm.items()}
    bw = max(res["bandwidth"], key=lambda b: b["gbps"])
    res["bandwidth_gbps"] = bw["gbps"]
    res["bandwidth_source"] = bw["method"]
    for g in res["gemm"]:
        log_fn(f"  GEMM  {g['lib']:<36} {g['dtype']:<9} {g['shape']:<15} {g['gflops']:8.1f} GFLOP/s")
    for b in res["bandwidth"]:
        log_fn(f"  read  {b['method']:<28} {b['gbps']:8.1f} GB/s")
    res["_handles"] = handles
    return res


class LimitProbes:
    """Short GEMM-rate and read-bandwidth probes run once per timed round, so
    that each shape's efficiency is judged against the machine's speed *while
    that shape ran* (on a shared VM host the speed drifts by 2x and more)."""

    def __init__(self, torch, np, handles, quick: bool, startup_rates=None):
        self.torch = torch
        n = self.n = 2048
        # a dtype whose start-up GEMM took seconds (torch's bfloat16 fallback held to
        # AVX2, ~0.4 GFLOP/s) keeps its start-up rate instead of a probe per round
        self.fixed_rate = {dt: r for dt, r in (startup_rates or {}).items() if 2.0 * n**3 / (r * 1e9) > 2.0}
        self.flops = 2.0 * n**3
        g = torch.Generator().manual_seed(1)
        self.a = {dt: torch.randn(n, n, generator=g).to(getattr(torch, dt)) for dt in ("float32", "bfloat16")}
        self.b = {dt: torch.randn(n, n, generator=g).to(getattr(torch, dt)) for dt in ("float32", "bfloat16")}
        self.sg = handles.get("openblas_SkylakeX") or handles.get("openblas_auto")
        if self.sg is not None:
            self.an, self.bn = self.a["float32"].numpy(), self.b["float32"].numpy()
            self.cn = np.empty((n, n), dtype=np.float32)
        self.nbytes = 2**28 if quick else 2**29
        self.buf = torch.randn(self.nbytes // 4, generator=g)

    def measure(self, dtype: str):
        torch = self.torch
        best_t = self.flops / (self.fixed_rate[dtype] * 1e9) if dtype in self.fixed_rate else float("inf")
        fns = [] if dtype in self.fixed_rate else [lambda: torch.matmul(self.a[dtype], self.b[dtype])]
        # a 16-bit dtype is judged against the best GEMM of the machine for that work: its own
        # matmul or the float32 one, whichever is faster (held to AVX2, torch's bfloat16 matmul is
        # a 0.4 GFLOP/s loop, and the engine widens to float32 and runs float32 FMAs)
        if dtype != "float32" and "float32" not in self.fixed_rate:
            fns.append(lambda: torch.matmul(self.a["float32"], self.b["float32"]))
        if self.sg is not None:
            fns.append(lambda: self.sg(self.an, self.bn, self.cn))
        for f in fns:
            t0 = time.perf_counter()
            f()
            best_t = min(best_t, time.perf_counter() - t0)
        best_r = float("inf")
        for f in (lambda: self.buf.sum(), lambda: self.buf.amax()):
            t0 = time.perf_counter()
            f()
            best_r = min(best_r, time.perf_counter() - t0)
        return self.flops / best_t / 1e9, self.nbytes / best_r / 1e9


# ----------------------------------------------------------------- routing

def make_routing(torch, T, E, K, renorm, seed):
    """Softmax over random logits with a random per-token temperature, so some
    tokens are confident (skewed top-k) and others flat, as trained routers
    give; returns (ids int64 (T,K), weights float32 (T,K))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * (0.5 + 2.5 * torch.rand(T, 1, generator=g))
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, K, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return ids, w


def num_batches(T, K, min_pairs, cap):
    """Small T is timed over several independent routings (decode steps), so
    that a drop rate is realised over enough (token, expert) pairs and the
    time is an average over routings rather than one lucky draw."""
    return max(1, min(cap, -(-min_pairs // (T * K))))


def normalised_scores(torch, ws):
    s = torch.cat([w.double() for w in ws], 0)
    return (s / s.sum(-1, keepdim=True)).flatten()


def pick_thresholds(torch, shat, r, kind):
    """Thresholds on the pooled normalised scores so that the lowest pairs are
    dropped: 1T drops round(r*N) pairs; 2T drops about r/2 of the pairs and
    halves about r (unit drop = a + b/2 = r, both levels present)."""
    v = torch.sort(shat).values
    N = v.numel()

    def cut(n):  # threshold between the n-th and (n+1)-th smallest
        n = min(max(n, 0), N)
        if n == 0:
            return float(v[0]) * 0.5
        if n == N:
            return float(v[-1]) * 1.5 + 1.0
        return 0.5 * (float(v[n - 1]) + float(v[n]))

    if kind == "1T":
        return [cut(round(r * N))]
    units = r * N
    na = max(1, round(units / 2))
    nh = max(1, round(2 * (units - na)))
    return [cut(na), cut(na + nh)]


def batch_accounting(levels, ids, P, E, I):
    """(neurons computed, neurons of distinct weight rows read): a pair at
    level l computes the first (l*I)//P neurons; expert e's weights are read
    up to its largest level over the batch."""
    import torch

    if levels is None:
        lv = torch.full(ids.shape, P, dtype=torch.int64)
    else:
        lv = levels.to(torch.int64)
    neurons = int(((lv * I) // P).sum())
    lmax = torch.zeros(E, dtype=torch.int64).scatter_reduce(0, ids.flatten(), lv.flatten(), "amax")
    distinct = int(((lmax * I) // P).sum())
    return neurons, distinct


# --------------------------------------------------------------- reference

def reference_parts(torch, x, ids, gu, dn, dtype, bounds):
    """Per-expert reference pieces for the check rows: for every expert e used
    by a row, fp32 outputs of each neuron segment [bounds[j], bounds[j+1]) of
    e's FFN for every row, shape (rows, segments, H).  Gate/up and down are
    computed in fp32 from the model's weights (upcast for 16-bit dtypes); for
    16-bit dtypes the SwiGLU activation is rounded to the dtype before the down
    projection, as the model does.  Any prefix partition is a sum of segments."""
    F = torch.nn.functional
    I = gu.shape[1] // 2
    xf = x.float()
    parts = {}
    for e in torch.unique(ids).tolist():
        W = gu[e].float()
        g = F.linear(xf, W)
        del W
        act = F.silu(g[:, :I]) * g[:, I:]
        if dtype != torch.float32:
            act = act.to(dtype).float()
        D = dn[e].float()
        parts[e] = torch.stack([F.linear(act[:, a:b], D[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)
        del D
    return parts


def reference_combine(torch, parts, ids, w, levels, P, I, bounds, H):
    """out[t] = sum_k w[t,k] * (segments of expert ids[t,k] below (level*I)//P)."""
    rows, K = ids.shape
    out = torch.zeros(rows, H, dtype=torch.float32)
    lv = torch.full(ids.shape, P, dtype=torch.int64) if levels is None else levels.to(torch.int64)
    wf = w.float()
    for t in range(rows):
        for k in range(K):
            n = (int(lv[t, k]) * I) // P
            if n == 0:
                continue
            nseg = bounds.index(n)  # segments [0, nseg) make up the prefix of n neurons
            out[t] += wf[t, k] * parts[int(ids[t, k])][t, :nseg].sum(0)
    return out


def rel_err(a, ref):
    a = a.float()
    d = (a - ref).norm().item()
    n = ref.norm().item()
    return d / n if n > 0 else d


# -------------------------------------------------------- implementations

class Impl:
    """One implementation (or engine policy) timed over the batch set."""

    def __init__(self, name, family, run_batch, *, policy="none", r=None, P=1, levels=None, thresholds=None,
                 extra_bytes=0, slack=1.0):
        self.name = name
        self.family = family          # "engine" | "hf"
        self.run_batch = run_batch    # run_batch(b) -> output of batch b
        self.policy = policy          # "none" | "1T" | "2T"
        self.r = r
        self.P = P
        self.levels = levels          # list per batch or None
        self.thresholds = thresholds
        self.extra_bytes = extra_bytes  # transient memory it allocates per call (for the memory guard)
        self.slack = slack            # time prediction slack for the pre-run budget check
        self.times = []
        self.skipped = None
        self.warm_s = None
        self.err = None
        self.check_ok = None
        self.phases_ms = None
        self.pre = None               # untimed step before each batch (engine_after_torch)

    def run_all(self, nb):
        """Runs the batch set; returns the seconds spent in run_batch (an
        untimed `pre` step, when set, runs before each batch)."""
        if self.pre is None:
            t0 = time.perf_counter()
            for b in range(nb):
                self.run_batch(b)
            return time.perf_counter() - t0
        total = 0.0
        for b in range(nb):
            self.pre(b)
            t0 = time.perf_counter()
            self.run_batch(b)
            total += time.perf_counter() - t0
        return total


def hf5_impls(torch, spec, dtype, gu, dn, cuda: bool = False):
    """transformers 5.x: the model's Experts module (built on the meta device
    from a config with the real sizes, its parameters then pointed at the
    engine's tensors) and its ExpertsInterface implementations (those that
    need CUDA only when `cuda`; bench_cuda.py uses this too)."""
    from transformers.integrations import moe as hfmoe

    H, I, E, K = spec["H"], spec["I"], spec["E"], spec["K"]
    if spec["model"].startswith("Mixtral"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Cls

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                            hidden_act="silu")
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as Cls

        cfg = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                          hidden_act="silu", norm_topk_prob=False)
    with torch.device("meta"):
        mod = Cls(cfg)
    mod.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(dn, requires_grad=False)
    mod.eval()
    # the class' own (eager) forward, as the ExpertsInterface falls back to it
    eager = getattr(Cls.forward, "__wrapped__", None)
    if eager is None:  # pragma: no cover - older 5.x without the decorator
        cfg._experts_implementation = "eager"
        eager = Cls.forward
    impls = {"hf5_eager": lambda x, ids, w: eager(mod, x, ids, w)}
    names = [n for n in hfmoe.ALL_EXPERTS_FUNCTIONS.keys() if cuda or n not in HF_CUDA_ONLY]
    for n in names:
        fn = hfmoe.ALL_EXPERTS_FUNCTIONS.get_interface(n, eager)
        impls[f"hf5_{n}"] = (lambda f: (lambda x, ids, w: f(mod, x, ids, w)))(fn)
    return mod, impls, {"cuda_only_not_run": [n for n in hfmoe.ALL_EXPERTS_FUNCTIONS.keys()
                                              if n in HF_CUDA_ONLY and not cuda],
                        "experts_class": f"{Cls.__module__}.{Cls.__name__}"}


def hf4_block(torch, spec, dtype, gu, dn):
    """transformers 4.57.x: the sparse MoE block (built on the meta device),
    its per-expert nn.Linear weights pointed at views of the engine's stacked
    tensors (same storage, no copy)."""
    H, I, E, K = spec["H"], spec["I"], spec["E"], spec["K"]
    mixtral = spec["model"].startswith("Mixtral")
    if mixtral:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Cls

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                            hidden_act="silu")
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Cls

        cfg = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                          hidden_act="silu", norm_topk_prob=False)
    with torch.device("meta"):
        block = Cls(cfg)
    block.gate.weight = torch.nn.Parameter(torch.zeros(E, H, dtype=dtype), requires_grad=False)
    gate_mods, up_mods, down_mods = [], [], []
    for e, ex in enumerate(block.experts):
        g, u, d = (ex.w1, ex.w3, ex.w2) if mixtral else (ex.gate_proj, ex.up_proj, ex.down_proj)
        g.weight = torch.nn.Parameter(gu[e, :I], requires_grad=False)
        u.weight = torch.nn.Parameter(gu[e, I:], requires_grad=False)
        d.weight = torch.nn.Parameter(dn[e], requires_grad=False)
        gate_mods.append(g)
        up_mods.append(u)
        down_mods.append(d)
    block.eval()

    if mixtral:
        def loop(hidden_states, selected_experts, routing_weights):
            # MixtralSparseMoeBlock.forward (4.57.x) after routing, verbatim
            # except that routing_weights/selected_experts are given.
            self = block
            hidden_dim = hidden_states.shape[-1]
            final_hidden_states = torch.zeros((hidden_states.shape[0], hidden_dim), dtype=hidden_states.dtype,
                                              device=hidden_states.device)
            expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for expert_idx in expert_hit:
                expert_layer = self.experts[expert_idx]
                idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
                current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
                current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
                final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
            return final_hidden_states
    else:
        def loop(hidden_states, selected_experts, routing_weights):
            # OlmoeSparseMoeBlock.forward (4.57.x) after routing, verbatim
            # except that routing_weights/selected_experts are given.
            self = block
            hidden_dim = hidden_states.shape[-1]
            final_hidden_states = torch.zeros((hidden_states.shape[0], hidden_dim), dtype=hidden_states.dtype,
                                              device=hidden_states.device)
            expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            for expert_idx in range(self.num_experts):
                expert_layer = self.experts[expert_idx]
                idx, top_x = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
                current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
                final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
            return final_hidden_states

    return block, loop, (gate_mods, up_mods, down_mods), {"block_class": f"{Cls.__module__}.{Cls.__name__}"}


# ------------------------------------------------------------------ driver

def run_benchmark(args):
    import numpy as np
    import torch
    import transformers

    ds, ops = import_engine()
    import inspect

    engine_has_timings = "timings" in inspect.signature(ops.moe_experts).parameters
    torch.set_num_threads(args.threads)
    nt = args.threads
    tf_ver = transformers.__version__
    tf_major = int(tf_ver.split(".")[0])
    gen_tag = f"tf{tf_ver}"
    os.makedirs(args.out, exist_ok=True)
    if args.simd:
        usable = [k for k, ok in ops.simd_levels().items() if ok]
        if args.simd not in usable:
            raise SystemExit(f"--simd {args.simd}: not usable on this CPU/build (usable: {', '.join(usable)})")
        ops.set_simd_level(args.simd)
    so = [os.path.join(os.path.dirname(ds.__file__), f) for f in os.listdir(os.path.dirname(ds.__file__))
          if f.startswith("_C.") and f.endswith(".so")]
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": nt,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "transformers": tf_ver,
        "dualsparse": getattr(ds, "__version__", "?"),
        "dualsparse_path": os.path.dirname(ds.__file__),
        "engine_so": [file_digest(p) for p in so],
        "simd_level": ops.simd_level(),
        "down_layout": args.down_layout,
        "library_env": {v: os.environ.get(v) for v in AVX2_LIBRARY_ENV},
        "git": git_state(),
        "args": {k: v for k, v in vars(args).items()},
    }
    log(f"dualsparse {meta['dualsparse']} ({meta['dualsparse_path']}, SIMD {meta['simd_level']}), "
        f"torch {torch.__version__}, transformers {tf_ver}, {nt} thread(s), CPU {meta['cpu']}")

    log("machine limits:")
    wait_idle(args.wait_idle, args.idle_threshold)
    s0 = cpu_snapshot()
    limits = machine_limits(torch, np, args.quick, dtypes=tuple(args.dtypes))
    limits["other_load"] = other_load(s0, cpu_snapshot())
    probes = LimitProbes(torch, np, limits.pop("_handles"), args.quick, limits.get("gemm_rate_gflops"))
    gemm_rate = limits["gemm_rate_gflops"]
    bw = limits["bandwidth_gbps"]

    rows = []
    hf_info = {}
    t_start = time.perf_counter()
    steps = [(s, d, T) for s in args.shapes for d in args.dtypes for T in args.tokens]
    bar = _progress(len(steps), f"bench_experts {gen_tag}")
    for shape in args.shapes:
        spec = SHAPES[shape]
        H, I, E, K = spec["H"], spec["I"], spec["E"], spec["K"]
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            el = torch.tensor([], dtype=dtype).element_size()
            wbytes = E * 3 * H * I * el
            log(f"\n== {spec['model']} {dname}: allocating {wbytes / 2**30:.2f} GiB of expert weights")
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed + (0 if shape == "olmoe" else 7))
            gu = torch.empty(E, 2 * I, H, dtype=dtype)
            dn = torch.empty(E, H, I, dtype=dtype)
            for e in range(E):  # per expert, so no full-size fp32 temporary
                gu[e].copy_(torch.randn(2 * I, H, generator=g).mul_(H ** -0.5))
                dn[e].copy_(torch.randn(H, I, generator=g).mul_(I ** -0.5))
            log(f"   weights ready in {time.perf_counter() - t0:.1f}s")

            o_proj = torch.randn(H, H, generator=g).mul_(H ** -0.5).to(dtype)
            hf_fns = {}
            hf_info = {}
            engine_split_lists = None
            if tf_major >= 5:
                mod, hf_fns, hf_info = hf5_impls(torch, spec, dtype, gu, dn)
            else:
                block, loop, engine_split_lists, hf_info = hf4_block(torch, spec, dtype, gu, dn)
                hf_fns = {"hf4_loop": loop}

            # the engine's down_proj: the (E, H, I) rows, or the partition-major copy whose
            # two column blocks let 2T-Drop's half experts read whole rows (--down-layout)
            dn_engine = ops.partition_down(dn, 2) if args.down_layout == "parts" else dn
            for T in args.tokens:
                nb = num_batches(T, K, args.min_pairs, args.max_batches)
                # routing weights in the dtype the model's router hands its experts:
                # transformers 5 Mixtral keeps float32, OLMoE casts to the logits dtype;
                # transformers 4 blocks cast both to the hidden dtype.
                w_dtype = torch.float32 if (tf_major >= 5 and spec["renorm"]) else dtype
                batches = []
                for b in range(nb):
                    seed = args.seed * 1_000_003 + (0 if shape == "olmoe" else 500_000) + T * 1000 + b
                    ids, w = make_routing(torch, T, E, K, spec["renorm"], seed)
                    gx = torch.Generator().manual_seed(seed + 77)
                    x = torch.randn(T, H, generator=gx).to(dtype)
                    batches.append(dict(x=x, ids=ids, w=w.to(w_dtype), out=torch.empty(T, H, dtype=dtype)))
                shat = normalised_scores(torch, [bt["w"] for bt in batches])

                impls = []

                def engine_runner(levels, P, split=False):
                    if split:
                        gms, ums, dms = engine_split_lists

                        def f(b, **kw):
                            bt = batches[b]
                            return ops.moe_experts_split(bt["x"], bt["ids"], bt["w"], gms, ums, dms,
                                                         levels=None if levels is None else levels[b],
                                                         num_partitions=P, out=bt["out"], num_threads=nt, **kw)
                    else:
                        def f(b, **kw):
                            bt = batches[b]
                            return ops.moe_experts(bt["x"], bt["ids"], bt["w"], gu, dn_engine,
                                                   levels=None if levels is None else levels[b],
                                                   num_partitions=P, out=bt["out"], num_threads=nt, **kw)
                    return f

                impls.append(Impl("engine", "engine", engine_runner(None, 1)))
                if not args.no_after_torch:
                    # the same call right after a torch GEMM the size of the attention output
                    # projection (T x H @ H x H, untimed), as in a model's layer: torch's OpenMP
                    # workers still spin then and compete with the engine's threads
                    im_at = Impl("engine_after_torch", "engine", engine_runner(None, 1))
                    im_at.pre = (lambda b: torch.matmul(batches[b]["x"], o_proj))
                    impls.append(im_at)
                if engine_split_lists is not None:
                    impls.append(Impl("engine_split", "engine", engine_runner(None, 1, split=True)))
                for name, fn in hf_fns.items():
                    extra = 0
                    slack = 4.0
                    if name.endswith("batched_mm"):
                        extra = T * K * 3 * H * I * el  # one gathered copy of an expert per pair
                        slack = 8.0
                    impls.append(Impl(name, "hf",
                                      (lambda f: (lambda b: f(batches[b]["x"], batches[b]["ids"], batches[b]["w"])))(fn),
                                      extra_bytes=extra, slack=slack))
                if not args.no_drops:
                    for r in args.rates:
                        for kind in ("1T", "2T"):
                            thr = pick_thresholds(torch, shat, r, kind)
                            P = len(thr)
                            lv = [ops.route_levels(bt["w"], thr) for bt in batches]
                            impls.append(Impl(f"engine_{kind}_{r:g}", "engine", engine_runner(lv, P),
                                              policy=kind, r=r, P=P, levels=lv, thresholds=thr))
                            if engine_split_lists is not None and args.split_drops:
                                impls.append(Impl(f"engine_split_{kind}_{r:g}", "engine",
                                                  engine_runner(lv, P, split=True),
                                                  policy=kind, r=r, P=P, levels=lv, thresholds=thr))

                # accounting (per batch averages)
                for im in impls:
                    neu = dist = 0
                    for b, bt in enumerate(batches):
                        n_, d_ = batch_accounting(None if im.levels is None else im.levels[b], bt["ids"], im.P, E, I)
                        neu += n_
                        dist += d_
                    im.neurons = neu / nb
                    im.flops = 2.0 * 3 * H * im.neurons
                    im.bytes = 3.0 * H * el * dist / nb
                    if im.levels is not None:
                        tot = sum(int(l.to(torch.int64).sum()) for l in im.levels)
                        npairs = sum(l.numel() for l in im.levels)
                        im.drop = 1.0 - tot / (im.P * npairs)
                        im.frac_half = (sum(int((l == 1).sum()) for l in im.levels) / npairs) if im.P == 2 else 0.0
                        im.frac_zero = sum(int((l == 0).sum()) for l in im.levels) / npairs
                    else:
                        im.drop = 0.0
                        im.frac_half = im.frac_zero = 0.0

                # budget checks before running anything
                for im in impls:
                    if im.extra_bytes > args.max_extra_gb * 2**30:
                        im.skipped = (f"needs {im.extra_bytes / 2**30:.1f} GiB of gathered expert copies "
                                      f"(> --max-extra-gb {args.max_extra_gb:g})")
                        continue
                    # at T = 1 every expert multiplies one row: torch runs matrix-vector
                    # products, bound by the weight reads whatever the dtype's GEMM rate
                    # (bfloat16 held to AVX2: a 0.4 GFLOP/s GEMM fallback, 20-30 ms GEMV steps)
                    flop_s = 0.0 if T == 1 else im.flops / (gemm_rate.get(dname, 50.0) * 1e9)
                    est = nb * im.slack * max(flop_s, (im.bytes + 2 * im.extra_bytes) / (bw * 1e9))
                    # the engine is always timed (a dtype whose measured GEMM rate is a slow
                    # fallback, bfloat16 held to AVX2, says nothing about the engine)
                    if im.family != "engine" and est * (1 + args.min_repeats) > args.config_budget:
                        im.skipped = (f"predicted {est:.1f}s per call x {1 + args.min_repeats} "
                                      f"> --config-budget {args.config_budget:g}s")

                # warm-up + correctness check: the first rows of the first batches
                # (check_rows in all) against a torch fp32 reference
                plan, got = [], 0
                for b in range(nb):
                    if got >= args.check_rows:
                        break
                    k_rows = min(T, args.check_rows - got)
                    plan.append((b, k_rows))
                    got += k_rows
                cat = lambda key: torch.cat([batches[b][key][:k] for b, k in plan], 0)  # noqa: E731
                x_chk, ids_chk, w_chk = cat("x"), cat("ids"), cat("w")
                bounds = sorted({(l * I) // im.P for im in impls for l in range(im.P + 1)})
                with torch.inference_mode():
                    parts = reference_parts(torch, x_chk, ids_chk, gu, dn, dtype, bounds)
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                with torch.inference_mode():
                    for im in impls:
                        if im.skipped:
                            log(f"   skip {spec['model']} {dname} T={T} {im.name}: {im.skipped}")
                            continue
                        outs = []
                        try:
                            t0 = time.perf_counter()
                            for b in range(nb):
                                if im.pre is not None:
                                    im.pre(b)
                                o = im.run_batch(b)
                                if b < len(plan):
                                    outs.append(o[:plan[b][1]].clone())
                            im.warm_s = (time.perf_counter() - t0) / nb
                        except Exception as exc:  # an HF path that does not run on this CPU/dtype
                            im.skipped = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                            log(f"   skip {spec['model']} {dname} T={T} {im.name}: {im.skipped}")
                            continue
                        lv_chk = None if im.levels is None else torch.cat([im.levels[b][:k] for b, k in plan], 0)
                        ref = reference_combine(torch, parts, ids_chk, w_chk, lv_chk, im.P, I, bounds, H)
                        im.err = rel_err(torch.cat(outs, 0), ref)
                        im.check_ok = bool(math.isfinite(im.err) and im.err <= tol)
                        if not im.check_ok:
                            log(f"   WARNING {spec['model']} {dname} T={T} {im.name}: relative error {im.err:.2e} "
                                f"vs the torch fp32 reference (tolerance {tol:g})")
                        if im.warm_s * nb * args.min_repeats > args.config_budget:
                            im.skipped = (f"one call took {im.warm_s * nb:.1f}s; x{args.min_repeats} repeats "
                                          f"> --config-budget {args.config_budget:g}s")
                            log(f"   skip {spec['model']} {dname} T={T} {im.name}: {im.skipped}")
                        del outs
                    del parts
                    # extra warm-up for short calls (thread pools, page faults, caches)
                    live = [im for im in impls if not im.skipped]
                    for im in live:
                        k = 0
                        while k < 3 and im.warm_s * nb * (k + 1) < 0.2:
                            im.run_all(nb)
                            k += 1

                    # interleaved timing rounds; the other processes' CPU share is measured
                    # per round, and only quiet rounds count (see --idle-threshold)
                    wait_idle(args.wait_idle, args.idle_threshold)
                    order_rng = np.random.default_rng(args.seed + T)
                    t_shape = time.perf_counter()
                    all_rounds = []  # (other load, {impl name: seconds per batch})
                    while live:
                        if all_rounds and all_rounds[-1][0] > args.idle_threshold:
                            wait_idle(args.wait_idle, args.idle_threshold)
                        # a fresh random order every round, and a short idle gap before each
                        # implementation, so none always follows the same predecessor (a torch
                        # op leaves OpenMP workers spinning for a few ms; see engine_after_torch)
                        order = [live[i] for i in order_rng.permutation(len(live))]
                        snap0 = cpu_snapshot()
                        times = {}
                        for im in order:
                            if args.gap_ms > 0:
                                time.sleep(args.gap_ms / 1e3)
                            times[im.name] = im.run_all(nb) / nb
                        if args.gap_ms > 0:
                            time.sleep(args.gap_ms / 1e3)
                        probe = probes.measure(dname)
                        all_rounds.append((other_load(snap0, cpu_snapshot()), times, probe))
                        n_quiet = sum(1 for r in all_rounds if r[0] <= args.idle_threshold)
                        el_s = time.perf_counter() - t_shape
                        if n_quiet >= args.max_repeats or len(all_rounds) >= 3 * args.max_repeats:
                            break
                        if n_quiet >= args.min_repeats and el_s >= args.shape_budget:
                            break
                        if len(all_rounds) >= args.min_repeats and el_s >= args.shape_budget + args.noisy_budget:
                            break
                    quiet = [r for r in all_rounds if r[0] <= args.idle_threshold]
                    used = quiet if len(quiet) >= args.min_repeats else \
                        sorted(all_rounds, key=lambda r: r[0])[:args.min_repeats]
                    for im in live:
                        im.times = [r[1][im.name] for r in used]
                    rounds = len(used)
                    rounds_total = len(all_rounds)
                    bg_load = sum(r[0] for r in used) / max(1, len(used))
                    # the machine's speed during these rounds (falls back to the start-up limits)
                    shape_gemm = median([r[2][0] for r in used]) if used else gemm_rate[dname]
                    shape_bw = median([r[2][1] for r in used]) if used else bw
                    if rounds < rounds_total:
                        log(f"   {rounds_total - rounds} of {rounds_total} rounds discarded as noisy "
                            f"(other processes > {args.idle_threshold:.0%} of the CPUs)")
                    if bg_load > args.idle_threshold:
                        log(f"   NOTE: other processes used {bg_load:.0%} of the CPUs during the rounds kept: "
                            f"times are noisy")

                    # the engine's own phase timings (routing plan, gate/up, down, combine), one
                    # extra untimed pass, where this build of the engine offers them
                    if engine_has_timings:
                        for im in live:
                            if im.family != "engine":
                                continue
                            acc = np.zeros(4)
                            try:
                                for b in range(nb):
                                    tm = np.zeros(4)
                                    if im.pre is not None:
                                        im.pre(b)
                                    im.run_batch(b, timings=tm)
                                    acc += tm
                                im.phases_ms = [float(v) * 1e3 / nb for v in acc]
                            except Exception as exc:  # pragma: no cover
                                log(f"   (phase timings unavailable: {exc})")

                    # route_levels' own time per batch set (the policy's overhead)
                    rl_time = {}
                    for im in impls:
                        if im.thresholds is not None and tuple(im.thresholds) not in rl_time:
                            thr = im.thresholds
                            rl_time[tuple(thr)] = timeit(
                                lambda: [ops.route_levels(bt["w"], thr) for bt in batches], 5) / nb

                # rows
                base = {"tf": tf_ver, "model": spec["model"], "shape": shape, "dtype": dname, "T": T,
                        "batches": nb, "H": H, "I": I, "E": E, "K": K, "bg_load": bg_load, "rounds": rounds,
                        "rounds_total": rounds_total, "limit_gemm_gflops": shape_gemm, "limit_bw_gbps": shape_bw}
                t_nodrop = {}
                for im in impls:
                    if im.policy == "none" and im.times:
                        t_nodrop[im.name] = median(im.times)
                hf_times = {im.name: median(im.times) for im in impls if im.family == "hf" and im.times}
                hf_best = min(hf_times.items(), key=lambda kv: kv[1]) if hf_times else (None, float("nan"))
                for im in impls:
                    t = median(im.times) if im.times else float("nan")
                    row = dict(base)
                    row.update({
                        "impl": im.name, "family": im.family, "policy": im.policy, "r_target": im.r, "P": im.P,
                        "thresholds": im.thresholds, "drop_rate": im.drop, "frac_pairs_half": im.frac_half,
                        "frac_pairs_dropped": im.frac_zero,
                        "time_ms": t * 1e3, "repeats": len(im.times),
                        "times_ms": [round(x * 1e3, 4) for x in im.times],
                        "iqr_ms": (float(np.percentile(im.times, 75) - np.percentile(im.times, 25)) * 1e3
                                   if len(im.times) >= 4 else None),
                        "warmup_ms": None if im.warm_s is None else im.warm_s * 1e3,
                        "skipped": im.skipped, "rel_err": im.err, "check_ok": im.check_ok,
                        "neurons_per_batch": im.neurons, "flops_per_batch": im.flops,
                        "distinct_weight_bytes_per_batch": im.bytes,
                        "engine_phases_ms": im.phases_ms,
                        "gflops": im.flops / t / 1e9 if im.times else None,
                        "gbps": im.bytes / t / 1e9 if im.times else None,
                    })
                    if im.times:
                        if T >= 128:
                            row["eff_kind"] = "gemm"
                            row["eff"] = row["gflops"] / shape_gemm
                        elif T <= 16:
                            row["eff_kind"] = "bandwidth"
                            row["eff"] = row["gbps"] / shape_bw
                        else:
                            row["eff_kind"], row["eff"] = None, None
                        row["eff_goal_met"] = None if row["eff"] is None else bool(row["eff"] >= 0.70)
                        # roofline: the time the machine limits allow for this much work and data
                        t_roof = max(im.flops / (shape_gemm * 1e9), im.bytes / (shape_bw * 1e9))
                        row["roofline_ms"] = t_roof * 1e3
                        row["roofline_bound"] = "gemm" if im.flops / shape_gemm >= im.bytes / shape_bw else "bandwidth"
                        row["roofline_eff"] = t_roof / t
                        # the same two terms added: the time if reading the weights and the
                        # arithmetic did not overlap at all (a core streams or computes)
                        t_serial = im.flops / (shape_gemm * 1e9) + im.bytes / (shape_bw * 1e9)
                        row["serial_ms"] = t_serial * 1e3
                        row["serial_eff"] = t_serial / t
                    if im.family == "engine" and im.policy == "none" and hf_best[0] is not None and im.times:
                        row["hf_best"] = hf_best[0]
                        row["hf_best_ms"] = hf_best[1] * 1e3
                        row["speedup_vs_hf_best"] = hf_best[1] / t
                    if im.policy != "none":
                        base_name = "engine_split" if im.name.startswith("engine_split") else "engine"
                        nd = next(x for x in impls if x.name == base_name)
                        row["levels_us"] = rl_time.get(tuple(im.thresholds), float("nan")) * 1e6
                        row["compute_ideal"] = im.neurons / nd.neurons
                        row["mem_ideal"] = im.bytes / nd.bytes
                        row["goal"] = 1.1 * (1 - im.r)
                        row["drop_rate_ok"] = bool(abs(im.drop - im.r) <= 0.01)
                        if im.times and base_name in t_nodrop:
                            row["ratio"] = t / t_nodrop[base_name]
                            row["goal_met"] = bool(row["ratio"] <= row["goal"])
                            row["mem_goal"] = 1.1 * row["mem_ideal"]
                            row["mem_goal_met"] = bool(row["ratio"] <= row["mem_goal"])
                            # below the share of the work still done: a speedup above 1 / (1 - r),
                            # which no kernel can give; the machine's noise, not a result
                            row["noise"] = bool(row["ratio"] < row["compute_ideal"])
                    rows.append(row)
                # one progress line per shape
                eng = next(r for r in rows[::-1] if r["impl"] == "engine" and r["T"] == T and r["dtype"] == dname)
                msg = (f"   {spec['model']:<13} {dname:<8} T={T:<4} x{nb:<2} rounds={rounds:<3} "
                       f"engine {eng['time_ms']:8.2f} ms")
                for name, tt in sorted(hf_times.items(), key=lambda kv: kv[1]):
                    msg += f" | {name} {tt * 1e3:8.2f} ms"
                if "speedup_vs_hf_best" in eng:
                    msg += f" | x{eng['speedup_vs_hf_best']:.2f} vs HF best"
                log(msg)
                drops = [r for r in rows if r["T"] == T and r["dtype"] == dname and r["model"] == spec["model"]
                         and r["policy"] != "none" and r.get("ratio") is not None and r["impl"].startswith("engine_")
                         and not r["impl"].startswith("engine_split")]
                if drops:
                    log("     drop ratios: " + "  ".join(
                        f"{r['policy']}@{r['drop_rate']:.3f}:{r['ratio']:.2f}"
                        f"{'(noise)' if r.get('noise') else '✓' if r['goal_met'] else '✗'}" for r in drops))
                del batches, impls, shat
                gc.collect()
                bar.update(1)
            # free this dtype's weights before the next
            if tf_major >= 5:
                del mod
            else:
                del block, loop, engine_split_lists
            del hf_fns, gu, dn, dn_engine, o_proj
            gc.collect()
    bar.close()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["peak_rss_gib"] = peak_rss_gb()
    meta["hf_info"] = hf_info
    result = {"meta": meta, "limits": limits, "rows": rows}
    stem = os.path.join(args.out, f"bench_experts_{gen_tag}")
    write_outputs(result, stem, [result])
    log(f"\nwrote {stem}.json / .csv / .md  ({meta['wall_s']:.0f}s, peak RSS {meta['peak_rss_gib']:.2f} GiB)")
    return result


# ----------------------------------------------------------------- output

CSV_FIELDS = ["tf", "model", "dtype", "T", "batches", "impl", "family", "policy", "r_target", "P", "thresholds",
              "drop_rate", "frac_pairs_half", "frac_pairs_dropped", "time_ms", "iqr_ms", "repeats", "skipped",
              "rel_err", "check_ok", "hf_best", "hf_best_ms", "speedup_vs_hf_best", "ratio", "goal", "goal_met",
              "compute_ideal", "mem_ideal", "mem_goal", "mem_goal_met", "noise", "levels_us", "gflops", "gbps", "eff_kind",
              "eff", "eff_goal_met", "roofline_ms", "roofline_bound", "roofline_eff", "serial_ms", "serial_eff",
              "neurons_per_batch",
              "distinct_weight_bytes_per_batch", "engine_phases_ms", "bg_load", "rounds", "rounds_total", "limit_gemm_gflops", "limit_bw_gbps"]


def write_outputs(result, stem, runs):
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    rows = [r for run in runs for r in run["rows"]]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    md = markdown(runs)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


def _ms(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def markdown(runs):
    """Tables from one or more runs (one per transformers generation)."""
    out = []
    for run in runs:
        m, lim = run["meta"], run["limits"]
        out.append(f"### Run: transformers {m['transformers']}, torch {m['torch']}, {m['date']}")
        out.append("")
        held = {k: v for k, v in (m.get("library_env") or {}).items() if v}
        out.append(f"CPU: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; engine SIMD {m['simd_level']}; "
                   + (f"engine down_proj {m['down_layout']} layout; " if m.get("down_layout", "rows") != "rows" else "")
                   + (f"libraries held by {', '.join(f'{k}={v}' for k, v in held.items())}; " if held else "")
                   + f"dualsparse {m['dualsparse']} at {m['git'].get('commit', '')[:10]}"
                   f"{' (+uncommitted changes)' if m['git'].get('dirty_files') else ''}; "
                   f"wall {m.get('wall_s', 0):.0f}s, peak RSS {m.get('peak_rss_gib', 0):.2f} GiB")
        out.append("")
        gr = lim["gemm_rate_gflops"]
        out.append("Machine limits at start-up: GEMM " + ", ".join(
            f"{dt} {gr[dt]:.0f} GFLOP/s ({lim['gemm_rate_source'][dt]})" if gr[dt] >= 10 else
            f"{dt} {gr[dt]:.2g} GFLOP/s ({lim['gemm_rate_source'][dt]})" for dt in gr) +
            f"; read bandwidth {lim['bandwidth_gbps']:.1f} GB/s ({lim['bandwidth_source']}).")
        out.append("")
    rows = [r for run in runs for r in run["rows"]]

    def get(tf, model, dt, T, impl):
        for r in rows:
            if r["tf"] == tf and r["model"] == model and r["dtype"] == dt and r["T"] == T and r["impl"] == impl:
                return r
        return None

    keys = []
    for r in rows:
        k = (r["model"], r["dtype"], r["T"])
        if k not in keys:
            keys.append(k)
    # ---- table 1: no drop
    out.append("#### No drop: engine vs Hugging Face (median ms per call; speedup = HF time / engine time)")
    out.append("")
    out.append("bg load = share of the CPUs that other processes used during the timed rounds (> 10%: noisy; "
               "one value per run).")
    out.append("")
    cols = []
    for run in runs:
        tf = run["meta"]["transformers"]
        gen = "tf" + tf.split(".")[0]
        impls = []
        for r in run["rows"]:
            if r["policy"] == "none" and r["impl"] not in impls:
                impls.append(r["impl"])
        cols.append((tf, gen, impls))
    multi = len(cols) > 1

    def label(gen, impl):
        if impl.startswith("hf"):
            return impl.replace("hf5_", "HF5 ").replace("hf4_", "HF4 ")
        return f"{impl} ({gen} run)" if multi else impl

    head = ["model", "dtype", "T"]
    for tf, gen, impls in cols:
        head += [label(gen, i) for i in impls]
        if any(i.startswith("hf5_") for i in impls):
            head += ["HF5 best", "speedup engine vs HF5 best"]
        if "hf4_loop" in impls:
            head += ["speedup engine_split vs HF4 loop"]
    head.append("bg load")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for (model, dt, T) in keys:
        cells = [model, dt, str(T)]
        loads = []
        for tf, gen, impls in cols:
            for i in impls:
                r = get(tf, model, dt, T, i)
                if r is None:
                    cells.append("")
                elif r["skipped"]:
                    cells.append("skipped")
                else:
                    mark = "" if r.get("check_ok") in (True, None) else " (!err)"
                    cells.append(_ms(r["time_ms"]) + mark)
            if any(i.startswith("hf5_") for i in impls):
                e = get(tf, model, dt, T, "engine")
                if e and e.get("hf_best"):
                    cells += [f"{_ms(e['hf_best_ms'])} ({e['hf_best'][4:]})", f"**{e['speedup_vs_hf_best']:.2f}x**"]
                else:
                    cells += ["-", "-"]
            if "hf4_loop" in impls:
                e, h = get(tf, model, dt, T, "engine_split"), get(tf, model, dt, T, "hf4_loop")
                if e and h and e["time_ms"] and h["time_ms"] and not e["skipped"] and not h["skipped"]:
                    cells.append(f"**{h['time_ms'] / e['time_ms']:.2f}x**")
                else:
                    cells.append("-")
            e = get(tf, model, dt, T, "engine")
            if e and e.get("bg_load") is not None:
                loads.append(e["bg_load"])
        cells.append("/".join(f"{x:.0%}" for x in loads) if loads else "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    # ---- table 2: drops
    drop_rows = [r for r in rows if r["policy"] != "none" and r["family"] == "engine"]
    if drop_rows:
        out.append("#### With drops: engine time(drop) / time(no drop)")
        out.append("")
        out.append("goal = 1.1 x (1 - r); compute ideal = neurons computed / no drop; memory ideal = distinct weight "
                   "bytes read / no drop (an expert partition none of whose pairs needs it is not read); "
                   "met = noise where the ratio is below the compute ideal (a speedup above 1 / (1 - r): "
                   "the machine's noise, not a result).")
        out.append("")
        head = ["tf", "model", "dtype", "T", "policy", "r", "actual drop", "half/dropped pairs", "ms", "ratio",
                "goal", "met", "compute ideal", "memory ideal", "met vs 1.1 x mem ideal", "route_levels us"]
        if len(runs) == 1:
            head = head[1:]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in drop_rows:
            cells = [r["tf"], r["model"], r["dtype"], str(r["T"]),
                     r["policy"] + (" split" if r["impl"].startswith("engine_split") else ""), f"{r['r_target']:g}",
                     f"{r['drop_rate']:.3f}" + ("" if r.get("drop_rate_ok") else " (!)"),
                     f"{r['frac_pairs_half']:.2f}/{r['frac_pairs_dropped']:.2f}",
                     "skipped" if r["skipped"] else _ms(r["time_ms"]),
                     f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-",
                     f"{r['goal']:.3f}",
                     ("noise" if r.get("noise") else "yes" if r.get("goal_met") else "NO")
                     if r.get("ratio") is not None else "-",
                     f"{r['compute_ideal']:.3f}", f"{r['mem_ideal']:.3f}",
                     ("yes" if r.get("mem_goal_met") else "NO") if r.get("ratio") is not None else "-",
                     f"{r['levels_us']:.1f}"]
            if len(runs) == 1:
                cells = cells[1:]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    # ---- table 3: efficiency
    out.append("#### Efficiency vs machine limits (no drop)")
    out.append("")
    out.append("prefill (T >= 128): FLOP rate = 2*3*H*(neurons computed)/time, as a fraction of the best "
               "GEMM rate for the dtype (a 16-bit dtype: its own matmul or the float32 one, whichever is "
               "faster); decode (T <= 16): distinct weight bytes / time, as a fraction of the read "
               "bandwidth; both limits probed in every timed round of that shape (2048^3 GEMM, 512 MB sum), "
               "median. Goal: >= 70%. roofline = max(flops / GEMM rate, distinct bytes / bandwidth) / time "
               "(the bound that applies: e.g. OLMoE at T=128 reads every expert for ~16 tokens each); "
               "no overlap = (flops / GEMM rate + distinct bytes / bandwidth) / time, the same terms "
               "added: the time if no read overlapped any arithmetic (above 100%: the engine overlaps them).")
    out.append("")
    head = ["tf", "model", "dtype", "T", "impl", "GFLOP/s", "GB/s", "limit", "efficiency", "goal met", "roofline",
            "no overlap"]
    if len(runs) == 1:
        head = head[1:]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for run in runs:
        gr, bwv = run["limits"]["gemm_rate_gflops"], run["limits"]["bandwidth_gbps"]
        for r in run["rows"]:
            if r["policy"] != "none" or r["skipped"] or not r.get("eff_kind"):
                continue
            lg = r.get("limit_gemm_gflops") or gr[r["dtype"]]
            lb = r.get("limit_bw_gbps") or bwv
            lim = f"{lg:.0f} GFLOP/s" if r["eff_kind"] == "gemm" else f"{lb:.1f} GB/s"
            cells = [r["tf"], r["model"], r["dtype"], str(r["T"]), r["impl"], f"{r['gflops']:.1f}", f"{r['gbps']:.1f}",
                     lim, f"{100 * r['eff']:.0f}% ({'FLOP' if r['eff_kind'] == 'gemm' else 'BW'})",
                     "yes" if r["eff_goal_met"] else "NO",
                     f"{100 * r['roofline_eff']:.0f}% ({r['roofline_bound']})",
                     f"{100 * r['serial_eff']:.0f}%" if r.get("serial_eff") is not None else "-"]
            if len(runs) == 1:
                cells = cells[1:]
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    skipped = [r for r in rows if r["skipped"]]
    if skipped:
        out.append("Skipped: " + "; ".join(f"{r['tf']} {r['model']} {r['dtype']} T={r['T']} {r['impl']}: {r['skipped']}"
                                           for r in skipped))
        out.append("")
    bad = [r for r in rows if r.get("check_ok") is False]
    if bad:
        out.append("Correctness warnings (relative error vs torch reference on the first rows): " + "; ".join(
            f"{r['tf']} {r['model']} {r['dtype']} T={r['T']} {r['impl']}: {r['rel_err']:.2e}" for r in bad))
        out.append("")
    return "\n".join(out)


def merge(paths, out_dir):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    runs.sort(key=lambda r: [int(x) if x.isdigit() else x for x in r["meta"]["transformers"].split(".")], reverse=True)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "bench_experts_merged")
    write_outputs({"runs": runs}, stem, runs)
    print(f"\nwrote {stem}.json / .csv / .md")


# -------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: OLMoE only, T=1,128, r=0.25, few repeats (< 1 minute)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None, help="default: olmoe mixtral")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="default: float32 bfloat16")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="default: 1 16 128 512")
    p.add_argument("--rates", nargs="+", type=float, default=None, help="drop rates (default 0.1 0.25 0.5)")
    p.add_argument("--no-drops", action="store_true", help="only the no-drop comparison")
    p.add_argument("--split-drops", action="store_true",
                   help="(transformers 4) also time drop policies through moe_experts_split")
    p.add_argument("--threads", type=int, default=2, help="torch and engine threads (default 2)")
    p.add_argument("--gap-ms", type=float, default=10.0,
                   help="idle gap before each implementation's timed run within a round (default 10 ms)")
    p.add_argument("--no-after-torch", action="store_true",
                   help="do not time engine_after_torch (the engine right after a torch GEMM)")
    p.add_argument("--min-repeats", type=int, default=None, help="timed rounds at least (default 5; quick 3)")
    p.add_argument("--max-repeats", type=int, default=None, help="timed rounds at most (default 40; quick 10)")
    p.add_argument("--shape-budget", type=float, default=None,
                   help="seconds of timed rounds per (model, dtype, T) once min-repeats are done (default 20; quick 2)")
    p.add_argument("--config-budget", type=float, default=240.0,
                   help="skip an implementation whose min-repeats calls would take longer (seconds, default 240)")
    p.add_argument("--max-extra-gb", type=float, default=4.0,
                   help="skip batched_mm when its gathered expert copies exceed this (GiB, default 4)")
    p.add_argument("--min-pairs", type=int, default=128,
                   help="small T is timed over ceil(min_pairs/(T*K)) routings (default 128)")
    p.add_argument("--max-batches", type=int, default=32, help="cap on routings per T (default 32)")
    p.add_argument("--check-rows", type=int, default=16,
                   help="token rows (from the first batches) checked against the torch fp32 reference (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simd", default=None, metavar="LEVEL",
                   help="the engine's SIMD level, one of ops.simd_levels() (default: the best this CPU has); e.g. avx2 measures the AVX2 "
                        "kernels on an AVX-512 machine")
    p.add_argument("--libraries-native", action="store_true",
                   help="with --simd avx2: leave torch, oneDNN, MKL and OpenBLAS at their best kernels (by default they are "
                        "held to AVX2 too, through " + ", ".join(AVX2_LIBRARY_ENV) + ")")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before the limits and each timed shape, wait up to this many seconds for other processes "
                        "to go quiet (default 0: do not wait; the load is measured and reported either way)")
    p.add_argument("--idle-threshold", type=float, default=0.10,
                   help="share of the CPUs other processes may use for the machine (or a timed round) to count as "
                        "quiet (default 0.10); noisy rounds are discarded while enough quiet ones come")
    p.add_argument("--noisy-budget", type=float, default=None,
                   help="extra seconds of rounds per (model, dtype, T) spent hoping for quiet rounds (default 180); "
                        "then the least loaded rounds are used and the load is reported; quick: 0)")
    p.add_argument("--down-layout", choices=("rows", "parts"), default="rows",
                   help="the engine's down_proj: rows, the (E, H, I) tensor (default), or parts, the "
                        "partition-major (E, 2, H, I/2) copy from ops.partition_down, with which the "
                        "half experts of 2T-Drop read whole rows of one block")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"), help="output folder (default bench-results/)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge result JSON files of several runs into one table and exit")
    a = p.parse_args(argv)
    if a.quick:
        a.shapes = a.shapes or ["olmoe"]
        a.tokens = a.tokens or [1, 128]
        a.rates = a.rates or [0.25]
        a.min_repeats = a.min_repeats or 3
        a.max_repeats = a.max_repeats or 10
        a.shape_budget = 2.0 if a.shape_budget is None else a.shape_budget
        a.min_pairs = min(a.min_pairs, 64)
        a.noisy_budget = 0.0 if a.noisy_budget is None else a.noisy_budget
    a.shapes = a.shapes or ["olmoe", "mixtral"]
    a.dtypes = a.dtypes or list(DTYPES)
    a.tokens = a.tokens or list(TOKENS)
    a.rates = a.rates or list(RATES)
    a.min_repeats = a.min_repeats or 5
    a.max_repeats = max(a.max_repeats or 40, a.min_repeats)
    a.shape_budget = 20.0 if a.shape_budget is None else a.shape_budget
    a.noisy_budget = 180.0 if a.noisy_budget is None else a.noisy_budget
    return a


#: Environment that holds torch (ATen, oneDNN, MKL) and numpy's OpenBLAS to
#: AVX2 kernels, so that on an AVX-512 machine `--simd avx2` compares the
#: engine's AVX2 kernels with libraries limited as on an AVX2 CPU.
AVX2_LIBRARY_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}


def main(argv=None):
    # numpy's bundled OpenBLAS (used only for the machine limits) must not leave
    # its worker threads spinning for ~0.1 s after each call: on 2 cores that
    # slows whatever is timed next.  Read once, when numpy loads it.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    args = parse_args(argv)
    if args.simd in ("avx2", "generic") and not args.libraries_native:
        # the limits and transformers' kernels at the same level as the engine
        # (each library reads its variable once, when it loads; none is loaded yet)
        for var, val in AVX2_LIBRARY_ENV.items():
            os.environ.setdefault(var, val)
    if args.merge:
        merge(args.merge, args.out)
        return 0
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

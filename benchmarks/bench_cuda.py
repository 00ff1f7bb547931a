#!/usr/bin/env python
"""GPU benchmark of dualsparse's CUDA expert path (bfloat16 or --dtype, OLMoE
and Mixtral expert shapes, T = 1, 16, 128, 1024, 4096).

At no drop, side by side on the same weight tensors:

* ``dualsparse``       dualsparse.ops.moe_experts on CUDA tensors (cuBLAS GEMMs,
                       one host synchronisation per call for the plan's row counts)
* ``dualsparse_gemm_loop``  the same with DUALSPARSE_CUDA_GEMM=loop (a cublasGemmEx
                       per expert) where the loaded cuBLAS has the grouped call
* ``torch_grouped_mm`` sort by expert + torch._grouped_mm for gate/up and down +
                       index_add combine (where torch has _grouped_mm for this GPU)
* ``hf5_<impl>``       the transformers 5.x Experts class' eager forward and every
                       ExpertsInterface implementation (grouped_mm, batched_mm, ...)

With drops: dualsparse under 1T-Drop (P=1) and 2T-Drop (P=2) at drop rates r
(--rates), reported as time(drop r) / time(no drop) next to the ideal 1 - r.
Levels are drawn at random per pair with the requested drop rate (2T: half
of the dropped computation as major-only pairs), so the rate is exact in
expectation for any model.

Timing: CUDA events around each call after warm-up, median of --iters.
Writes bench-results/bench_cuda-<stamp>.json and prints a table.
Exits with a message (status 1) when there is no usable GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys

SHAPES = {
    "olmoe": dict(model="OLMoE-1B-7B", H=2048, I=1024, E=64, K=8),
    "mixtral": dict(model="Mixtral-8x7B", H=4096, I=14336, E=8, K=2),
}


def die(msg):
    sys.exit(f"bench_cuda: {msg}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["olmoe", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 1024, 4096])
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers implementations")
    p.add_argument("--max-extra-gb", type=float, default=8.0,
                   help="skip hf5_batched_mm where its per-pair weight copies exceed this (default 8)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-results"))
    a = p.parse_args()

    try:
        import torch
    except ImportError:
        die("torch is not installed")
    if not torch.cuda.is_available():
        die("no CUDA device visible to torch (CPU-only torch build or no GPU); nothing to benchmark")
    from dualsparse import cuda as dcuda
    from dualsparse import ops

    ok, reason = dcuda.available()
    if not ok:
        die(f"the dualsparse CUDA path is not usable: {reason}")
    torch.set_grad_enabled(False)
    dev = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, a.dtype)
    rows = []
    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, torch_cuda=torch.version.cuda,
                module=dcuda.module().status(), dtype=a.dtype,
                started=_dt.datetime.now(_dt.timezone.utc).isoformat())
    print(f"# {meta['device']}, torch {meta['torch']} (CUDA {meta['torch_cuda']}), module {meta['module']}")

    def timeit(fn):
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(a.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e-3)
        return statistics.median(ts)

    for name in a.shapes:
        spec = SHAPES[name]
        H, I, E, K = spec["H"], spec["I"], spec["E"], spec["K"]
        g = torch.Generator(device=dev).manual_seed(0)
        gu = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dtype)
        dn = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dtype)
        hf = {}
        if not a.no_hf:
            try:
                from bench_experts import hf5_impls  # the same construction as the CPU benchmark

                hf = hf5_impls(torch, spec, dtype, gu, dn, cuda=True)[1]
            except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
                meta.setdefault("hf_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"# {name}: transformers experts unavailable: {meta['hf_errors'][name]}")
        for T in a.tokens:
            x = torch.randn(T, H, device=dev, generator=g).to(dtype)
            logits = torch.randn(T, E, device=dev, generator=g)
            w, ids = torch.softmax(logits, -1).topk(K, -1)
            if name == "mixtral":
                w = w / w.sum(-1, keepdim=True)
            res = {}
            res["dualsparse"] = timeit(lambda: ops.moe_experts(x, ids, w, gu, dn))
            grouped = dcuda.module().last_gemm_grouped()
            counts = dcuda.module().last_gemm_counts()
            if dcuda.module().blas_info()["grouped_gemm"]:  # the same with the cublasGemmEx loop
                os.environ["DUALSPARSE_CUDA_GEMM"] = "loop"
                try:
                    res["dualsparse_gemm_loop"] = timeit(lambda: ops.moe_experts(x, ids, w, gu, dn))
                finally:
                    del os.environ["DUALSPARSE_CUDA_GEMM"]
            # the op's one host synchronisation, measured: the wait inside it
            # with the GPU idle before the call, and right after queued work
            torch.cuda.synchronize(dev)
            ops.moe_experts(x, ids, w, gu, dn)
            sync_idle = dcuda.module().last_sync_seconds()
            big = torch.randn(4096, 4096, device=dev, dtype=dtype)
            big @ big
            ops.moe_experts(x, ids, w, gu, dn)
            sync_busy = dcuda.module().last_sync_seconds()
            # correctness on the device: against a float32 torch computation of
            # the same experts (bf16 weights and inputs, activation rounded to
            # bf16 as the engine does), relative to the output's scale
            ours = ops.moe_experts(x, ids, w, gu, dn).float()
            ref = torch_reference(torch, x, ids, w, gu, dn)
            rel_err = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            gm = torch_grouped_mm_impl(torch, gu, dn)
            if gm is not None:
                try:
                    res["torch_grouped_mm"] = timeit(lambda: gm(x, ids, w))
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    res["torch_grouped_mm"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            for impl, fn in hf.items():
                extra_gb = T * K * 3 * I * H * 2 / 2 ** 30
                if "batched" in impl and extra_gb > a.max_extra_gb:
                    res[impl] = f"skipped: copies {extra_gb:.0f} GiB of weights (--max-extra-gb)"
                    continue
                try:
                    res[impl] = timeit(lambda: fn(x, ids, w.to(dtype)))
                except Exception as exc:  # noqa: BLE001
                    res[impl] = f"failed: {type(exc).__name__}: {exc}"[:200]
            base = res["dualsparse"]
            others = [v for k, v in res.items() if not k.startswith("dualsparse") and isinstance(v, float)]
            row = dict(shape=name, T=T, dtype=a.dtype, no_drop=res, drops={}, grouped_gemm=grouped,
                       gemm_problems=counts, sync_wait_idle_s=sync_idle,
                       sync_wait_after_queued_gemm_s=sync_busy, max_rel_err_vs_f32=rel_err,
                       fastest_other_s=min(others) if others else None,
                       goal_no_drop_met=bool(others) and base <= min(others))
            for r in a.rates:
                for P in (1, 2):
                    u = torch.rand(T, K, device=dev, generator=g)
                    if P == 1:
                        lv = (u >= r).to(torch.int8)
                    else:  # level 0 with prob r/2, level 1 (major half) with prob r, else 2
                        lv = torch.where(u < r / 2, 0, torch.where(u < 1.5 * r, 1, 2)).to(torch.int8)
                    t = timeit(lambda: ops.moe_experts(x, ids, w, gu, dn, levels=lv, num_partitions=P))
                    real = float(1 - lv.float().sum() / (P * T * K))
                    row["drops"][f"{P}T r={r}"] = dict(seconds=t, ratio=t / base, ideal=1 - real, drop_rate=real,
                                                       goal_met=t / base <= 1.1 * (1 - real))
            rl = timeit(lambda: ops.route_levels(w, [0.09, 0.11]))
            row["route_levels_s"] = rl
            rows.append(row)
            cells = "  ".join(f"{k} {v * 1e3:.3f}ms" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
            print(f"{name:8s} T={T:5d}  {cells}  (sync wait {sync_idle * 1e6:.0f}us idle, "
                  f"{sync_busy * 1e6:.0f}us after a queued 4096^3 GEMM; max rel err vs float32 torch "
                  f"{rel_err:.2e}; no-drop goal {'met' if row['goal_no_drop_met'] else 'NOT met'})")
            print("         drops: " + "  ".join(f"{k}: {d['ratio']:.3f} (ideal {d['ideal']:.3f})"
                                             for k, d in row["drops"].items()) + f"  route_levels {rl * 1e6:.1f}us")
        hf = gu = dn = x = None  # noqa: F841 - free this shape before the next
        torch.cuda.empty_cache()

    meta["cublas"] = dcuda.module().blas_info()  # after the runs: includes refusals of the grouped call
    print(f"# cuBLAS {meta['cublas']}")
    os.makedirs(a.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(a.out, f"bench_cuda-{stamp}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print(f"wrote {path}")


def torch_reference(torch, x, ids, w, gu, dn):
    """float32 loop over experts (activation rounded to the weights' dtype):
    the on-device correctness check of the benchmark."""
    T, K = ids.shape
    I = gu.shape[1] // 2
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        t, k = torch.nonzero(ids == e, as_tuple=True)
        h = x[t].float() @ gu[e].float().t()
        act = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]).to(gu.dtype).float()
        out.index_add_(0, t, (act @ dn[e].float().t()) * w[t, k, None].float())
    return out


def torch_grouped_mm_impl(torch, gu, dn):
    """Sort by expert, torch._grouped_mm for gate/up and down, index_add
    combine: the torch-native grouped path (None where torch lacks it)."""
    gmm = getattr(torch, "_grouped_mm", None)
    if gmm is None:
        return None
    E, I2, H = gu.shape
    I = I2 // 2
    w1 = gu.transpose(1, 2)  # (E, H, 2I), a view
    w2 = dn.transpose(1, 2)  # (E, I, H), a view

    def run(x, ids, w):
        T, K = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // K
        counts = torch.bincount(flat, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[tok]
        h = gmm(xs, w1, offs=offs)
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = gmm(act, w2, offs=offs)
        y = y.float() * w.reshape(-1)[order, None].float()
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y)
        return out.to(x.dtype)

    return run


if __name__ == "__main__":
    main()

"""The "torch" backend of moe_experts: does a drop turn into time, and is it
as fast as transformers' own grouped_mm experts at no drop?

For the expert shapes of OLMoE-1B-7B (H 2048, I 1024, E 64, K 8) and
Mixtral-8x7B (H 4096, I 14336, E 8, K 2), T = 1, 16, 128, 512 tokens per call,
float32 and bfloat16, on the CPU (and on CUDA when torch sees a device),
this times, interleaved side by side in every repetition (so a load change
hits all of them alike):

* ``torch_nodrop``: ``moe_experts(..., backend="torch")`` with every pair full;
* ``hf5_grouped_mm``: transformers 5's ``grouped_mm`` experts implementation
  on the same tensors (the model's Experts module pointed at them);
* ``torch_1T_r`` / ``torch_2T_r`` for r = 0.25 and 0.5: the torch backend
  with thresholds chosen on the routing's normalised scores so that a
  fraction r of the expert work is dropped (1T: r of the pairs dropped;
  2T: about r/2 dropped and r halved).

Printed and written (JSON): medians with the spread (min and max over the
repetitions), the paired ratios time(drop r) / time(no drop) (median over
repetitions of the ratio within one repetition), the realised drop rate,
the goal ratio 1.1 * (1 - r) at T = 512, and a "noise" flag on ratios above
1 / (1 - r) (a drop cannot cost more than that: such a ratio says the
machine was busy during the measurement).  The load average before and after
each configuration and the engine's SIMD level are recorded.

    python benchmarks/bench_torch_backend.py --quick          # OLMoE, a few T, few repeats
    python benchmarks/bench_torch_backend.py                  # everything (Mixtral takes long)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_experts as BE  # noqa: E402  (shapes, routing, thresholds, transformers' experts)

RATES = (0.25, 0.5)


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_problem(torch, spec, dtype, T, device, nb, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, I, E, K = spec["H"], spec["I"], spec["E"], spec["K"]
    gu = torch.empty(E, 2 * I, H, dtype=dtype)
    dn = torch.empty(E, H, I, dtype=dtype)
    for e in range(E):  # per expert: no float32 copy of the whole Mixtral weights at once
        gu[e] = (torch.randn(2 * I, H, generator=g) / H ** 0.5).to(dtype)
        dn[e] = (torch.randn(H, I, generator=g) / I ** 0.5).to(dtype)
    gu, dn = gu.to(device), dn.to(device)
    batches = []
    for b in range(nb):
        ids, w = BE.make_routing(torch, T, E, K, spec["renorm"], seed=1000 + 17 * b + T)
        x = torch.randn(T, H, generator=g).to(dtype)
        batches.append((x.to(device), ids.to(device), w.to(device)))
    return gu, dn, batches


def levels_for(torch, ops, batches, r, kind):
    shat = BE.normalised_scores(torch, [w.cpu() for _, _, w in batches])
    thr = BE.pick_thresholds(torch, shat, r, kind)
    lv = [ops.route_levels(w, thr) for _, _, w in batches]
    P = len(thr)
    units = sum(float(l.to(torch.int64).sum()) for l in lv) / P
    pairs = sum(l.numel() for l in lv)
    return lv, P, 1.0 - units / pairs


def run(args):
    import numpy as np  # noqa: F401
    import torch

    _, ops = BE.import_engine()
    from dualsparse import _torch_moe

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    shapes = ["olmoe"] if args.quick else args.shapes
    tokens = args.tokens or ((1, 128, 512) if args.quick else BE.TOKENS)
    dtypes = args.dtypes
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": BE.cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "simd_level": ops.simd_level(),
        "loadavg_start": os.getloadavg(), "quick": bool(args.quick), "git": BE.git_state(),
        "grouped_mm": {f"{d}/{t}": _torch_moe.capabilities(d, getattr(torch, t)) for d in devices for t in dtypes},
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    print(f"# torch {meta['torch']}, transformers {meta['transformers']}, {meta['cpu']} "
          f"({meta['cores']} CPUs, {meta['torch_threads']} torch threads), engine SIMD {meta['simd_level']}, "
          f"load average {tuple(round(v, 2) for v in meta['loadavg_start'])}", flush=True)
    results = []
    for device in devices:
        for shape in shapes:
            spec = BE.SHAPES[shape]
            reps = args.repeats or (3 if shape == "mixtral" else (5 if args.quick else 11))
            for dname in dtypes:
                dtype = getattr(torch, dname)
                for T in tokens:
                    nb = BE.num_batches(T, spec["K"], 256, 16)
                    load0 = os.getloadavg()
                    gu, dn, batches = build_problem(torch, spec, dtype, T, device, nb)
                    variants = {}

                    def torch_call(lv, P):
                        def f():
                            for i, (x, ids, w) in enumerate(batches):
                                ops.moe_experts(x, ids, w, gu, dn, levels=None if lv is None else lv[i],
                                                num_partitions=P, backend="torch")
                        return f

                    variants["torch_nodrop"] = (torch_call(None, 1), 0.0)
                    hf_ok = meta["transformers"] and meta["transformers"].startswith("5")
                    if hf_ok:
                        mod, impls, _ = BE.hf5_impls(torch, spec, dtype, gu, dn, cuda=device.type == "cuda")
                        fn = impls.get("hf5_grouped_mm")
                        if fn is not None:
                            variants["hf5_grouped_mm"] = ((lambda fn: lambda: [fn(x, ids, w.to(dtype))
                                                                               for x, ids, w in batches])(fn), 0.0)
                    for kind in ("1T", "2T"):
                        for r in RATES:
                            lv, P, realised = levels_for(torch, ops, batches, r, kind)
                            variants[f"torch_{kind}_{r}"] = (torch_call(lv, P), realised)
                    names = list(variants)
                    times = {n: [] for n in names}
                    with torch.inference_mode():
                        for n in names:  # warm-up (and grouped_mm capability probes)
                            variants[n][0]()
                        _sync(torch, device)
                        for rep in range(reps):
                            order = names[rep % len(names):] + names[:rep % len(names)]
                            for n in order:
                                _sync(torch, device)
                                t0 = time.perf_counter()
                                variants[n][0]()
                                _sync(torch, device)
                                times[n].append((time.perf_counter() - t0) / nb)
                    load1 = os.getloadavg()
                    row = dict(device=device.type, shape=spec["model"], dtype=dname, T=T, batches=nb, repeats=reps,
                               loadavg_before=load0, loadavg_after=load1, variants={})
                    base = times["torch_nodrop"]
                    for n in names:
                        ts = times[n]
                        v = dict(median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), max_ms=1e3 * max(ts),
                                 realised_drop=variants[n][1])
                        if n != "torch_nodrop":
                            # paired within each repetition; for hf5_grouped_mm this is the
                            # torch backend's speedup (HF time / torch time)
                            ratio = statistics.median([a / b for a, b in zip(ts, base)])
                            v["ratio_to_torch_nodrop"] = ratio
                        if n.startswith("torch_") and n != "torch_nodrop":
                            r = float(n.rsplit("_", 1)[1])
                            v["rate"] = r
                            v["ideal_ratio"] = 1 - v["realised_drop"]
                            v["goal_ratio"] = 1.1 * (1 - r)
                            v["meets_goal"] = ratio <= v["goal_ratio"] if T == 512 else None
                            v["noise"] = ratio > 1 / (1 - r)
                        row["variants"][n] = v
                    results.append(row)
                    print_row(row)
                    del gu, dn, batches, variants
    meta["loadavg_end"] = os.getloadavg()
    out = {"meta": meta, "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"# load average at the end {tuple(round(v, 2) for v in meta['loadavg_end'])}; wrote {args.out}")
    return 0


def print_row(row):
    v = row["variants"]
    nd = v["torch_nodrop"]
    head = (f"{row['device']:4} {row['shape']:13} {row['dtype']:8} T={row['T']:<4} "
            f"load {row['loadavg_before'][0]:.1f}->{row['loadavg_after'][0]:.1f}  "
            f"torch no drop {nd['median_ms']:8.2f} ms [{nd['min_ms']:.2f}, {nd['max_ms']:.2f}]")
    hf = v.get("hf5_grouped_mm")
    if hf:
        head += (f"  hf5 grouped_mm {hf['median_ms']:8.2f} ms [{hf['min_ms']:.2f}, {hf['max_ms']:.2f}]"
                 f"  torch backend speedup {hf['ratio_to_torch_nodrop']:.2f}x (goal >= 0.95x)")
    print(head)
    for n, d in v.items():
        if not n.startswith("torch_") or n == "torch_nodrop":
            continue
        flag = " NOISE (above 1/(1-r))" if d["noise"] else ""
        goal = "" if d["meets_goal"] is None else ("  goal met" if d["meets_goal"] else "  goal NOT met")
        print(f"      {n:14} drop {d['realised_drop']:.3f}  {d['median_ms']:8.2f} ms [{d['min_ms']:.2f}, "
              f"{d['max_ms']:.2f}]  ratio {d['ratio_to_torch_nodrop']:.3f} (ideal {d['ideal_ratio']:.3f}, "
              f"goal <= {d['goal_ratio']:.3f}){goal}{flag}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="OLMoE only, T = 1, 128, 512, 5 repetitions")
    p.add_argument("--shapes", nargs="+", default=["olmoe", "mixtral"], choices=sorted(BE.SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="tokens per call (default 1 16 128 512)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 11; Mixtral 3; --quick 5)")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when a device is present")
    p.add_argument("--out", default="bench_torch_backend.json", help="JSON output path")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.tokens or ()):
        p.error("--tokens must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))

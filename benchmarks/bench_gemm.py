"""The engine's block GEMM against its dot tiles, side by side in one process.

On levels that have a block GEMM (AVX2: blocks of 32 rows and more of an
expert; AVX-512: 96 rows and more in float32, 32 and more in bfloat16 and
float16), ``ops.set_block_gemm(False)`` sends every block through the dot tiles
instead.  This script times ``ops.moe_experts`` (no drop) both ways on the
OLMoE-1B-7B and Mixtral-8x7B expert shapes with random weights: interleaved
rounds (each round runs both paths once, in a fresh random order, after an idle
gap), medians with their interquartile range, the ratio of the medians, and
the share of the CPUs other processes used during the rounds.  Routing: each
token picks K distinct experts uniformly at random (fixed seed), so an expert
gets about T*K/E rows.

    python benchmarks/bench_gemm.py --simd avx2 --dtypes float32,bfloat16 --tokens 128,512 \\
        --out bench-results/gemm-avx2
    python benchmarks/bench_gemm.py --simd avx512 --dtypes float32 --tokens 512,1024,2048 \\
        --out bench-results/gemm-avx512
    python benchmarks/bench_gemm.py --simd avx512 --dtypes bfloat16,float16 --tokens 128,512 \\
        --out bench-results/gemm-avx512-16

``--against LEVEL`` compares two SIMD levels the same way instead (both with
their block GEMMs), e.g. the AMX tile unit against the AVX-512 BF16 kernels:

    python benchmarks/bench_gemm.py --simd amx_bf16 --against avx512_bf16 --dtypes bfloat16 \\
        --tokens 1,16,64,128,512 --out bench-results/gemm-amx

``--rows`` compares the GEMV-shaped kernel's two rules for weight rows
(experts of 1-3 rows: decode), four rows at a time against one at a time
(``ops.set_rows_four``), at --simd:

    python benchmarks/bench_gemm.py --simd avx2 --rows --dtypes float32,bfloat16 --tokens 1,4,16 \\
        --out bench-results/gemm-rows

(At T <= 16 the timed calls cycle through 8 routings, so that the experts a
call reads are not those of the call before, still in a large last-level
cache.)

Prints a markdown table and writes <out>.json and <out>.md when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # name: (E, I, H, K)
    "olmoe": (64, 1024, 2048, 8),
    "mixtral": (8, 14336, 4096, 2),
}


def quartiles(v):
    q = np.percentile(np.asarray(v), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--simd", default=None, help="engine SIMD level (default: the best this CPU has; "
                   "block GEMMs exist at avx2 and, for bfloat16, amx_bf16)")
    p.add_argument("--against", default=None, help="a second SIMD level to compare --simd with "
                   "(instead of the block GEMM against the tiles)")
    p.add_argument("--rows", action="store_true", help="weight rows of the GEMV-shaped kernel four at a "
                   "time against one at a time (instead of the block GEMM against the tiles)")
    p.add_argument("--shapes", default="olmoe,mixtral", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--tokens", default="128,512", help="comma list of T")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per (shape, dtype, T) (default 9)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap-ms", type=float, default=20.0, help="idle gap before each timed call")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    a = p.parse_args(argv)
    if a.rows and a.against:
        p.error("--rows and --against compare different things; give one of them")
    for name, value in (("--rounds", a.rounds), ("--threads", a.threads)):
        if value < 1:
            p.error(f"{name} must be >= 1; got {value}")

    import torch
    from bench_experts import cpu_model, cpu_snapshot, other_load
    from dualsparse import ops

    levels = ops.simd_levels()
    for name, lv in (("--simd", a.simd), ("--against", a.against)):
        if lv is not None and not levels.get(lv, False):
            p.error(f"{name}: level {lv!r} is not usable here; usable: "
                    f"{', '.join(k for k, ok in levels.items() if ok)}")
    if a.simd:
        ops.set_simd_level(a.simd)
    level_a = ops.simd_level()
    # arm True: the block GEMM at --simd (or --simd itself); arm False: the tiles (or --against)
    label = ({True: "rows four at a time", False: "one at a time"} if a.rows
             else {True: "block GEMM", False: "dot tiles"} if a.against is None
             else {True: level_a, False: a.against})

    def use(arm):
        if a.rows:
            ops.set_rows_four(bool(arm))
        elif a.against is None:
            ops.set_block_gemm(bool(arm))
        else:
            ops.set_simd_level(level_a if arm else a.against)
    torch.set_num_threads(a.threads)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dts = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for d in dts:
        if d not in dtypes:
            p.error(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(dtypes)}")
    try:
        tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens must be a comma list of integers; got {a.tokens!r}")
    if not tokens or min(tokens) < 1:
        p.error(f"--tokens must be positive integers; got {a.tokens!r}")

    meta = {"cpu": cpu_model(), "simd_level": level_a, "against": a.against, "threads": a.threads,
            "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(f"CPU {meta['cpu']}, engine SIMD {meta['simd_level']}"
          + (f" against {a.against}" if a.against else "") + f", {a.threads} threads, {meta['date_utc']} UTC",
          flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        E, I, H, K = SHAPES[shape]
        for dn in dts:
            dt = dtypes[dn]
            g = torch.Generator().manual_seed(0)
            gu = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dt)
            down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dt)
            for T in tokens:
                x = torch.randn(T, H, generator=g).to(dt)
                n_routes = 8 if T <= 16 else 1   # decode: fresh experts from call to call
                routes = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
                          for _ in range(n_routes)]
                ids = routes[0]
                calls = 0
                tw = torch.rand(T, K, generator=g)
                out = torch.empty(T, H, dtype=dt)
                times = {True: [], False: []}
                loads = []
                for arm in (True, False):   # warm-up, and the two arms' outputs side by side
                    use(arm)
                    ops.moe_experts(x, ids, tw, gu, down, out=out, num_threads=a.threads)
                    if arm:
                        first = out.float().clone()
                diff = ((out.float() - first).abs().max() / first.abs().max()).item()
                try:
                    for _ in range(a.rounds):
                        s0 = cpu_snapshot()
                        for on in rng.permutation([True, False]):
                            use(on)
                            time.sleep(a.gap_ms / 1e3)
                            ids = routes[calls % n_routes]
                            calls += 1
                            t0 = time.perf_counter()
                            ops.moe_experts(x, ids, tw, gu, down, out=out, num_threads=a.threads)
                            times[bool(on)].append(time.perf_counter() - t0)
                        loads.append(other_load(s0, cpu_snapshot()))
                finally:
                    ops.set_block_gemm(True)
                    ops.set_rows_four(None)
                    ops.set_simd_level(level_a)
                flops = 2 * 3 * H * I * T * K
                q_on, q_off = quartiles(times[True]), quartiles(times[False])
                row = {"shape": shape, "dtype": dn, "T": T, "rows_per_expert": T * K / E,
                       "gemm_ms": [1e3 * v for v in q_on], "tiles_ms": [1e3 * v for v in q_off],
                       "gemm_gflops": flops / q_on[1] / 1e9, "tiles_gflops": flops / q_off[1] / 1e9,
                       "ratio": q_off[1] / q_on[1], "rounds": a.rounds, "bg_load": statistics.mean(loads),
                       "max_rel_diff": diff}
                rows.append(row)
                print(f"{shape:8s} {dn:9s} T={T:<5d} {label[True]} {row['gemm_ms'][1]:8.1f} ms "
                      f"({row['gemm_gflops']:.0f} GFLOP/s)  {label[False]} {row['tiles_ms'][1]:8.1f} ms "
                      f"({row['tiles_gflops']:.0f})  ratio {row['ratio']:.2f}x  bg {row['bg_load']:.0%}  "
                      f"max rel diff {diff:.1e}", flush=True)
            del gu, down

    md = [f"CPU {meta['cpu']}, engine SIMD {meta['simd_level']}"
          + (f" against {a.against}" if a.against else "") + f", {a.threads} threads, {meta['date_utc']} UTC, "
          f"{a.rounds} interleaved rounds; median ms [IQR]; max rel diff = largest |difference| of the two "
          "outputs over the largest |output|", "",
          f"| shape | dtype | T | rows per expert | {label[True]} | {label[False]} | {label[False]} / "
          f"{label[True]} | max rel diff | bg load |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g_, t_ = r["gemm_ms"], r["tiles_ms"]
        md.append(f"| {r['shape']} | {r['dtype']} | {r['T']} | {r['rows_per_expert']:.3g} | "
                  f"{g_[1]:.1f} [{g_[0]:.1f}-{g_[2]:.1f}] ({r['gemm_gflops']:.0f} GFLOP/s) | "
                  f"{t_[1]:.1f} [{t_[0]:.1f}-{t_[2]:.1f}] ({r['tiles_gflops']:.0f} GFLOP/s) | "
                  f"**{r['ratio']:.2f}x** | {r['max_rel_diff']:.1e} | {r['bg_load']:.0%} |")
    print("\n".join(md))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

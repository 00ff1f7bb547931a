"""Time the engine on one expert shape with no drop, 1T-Drop and 2T-Drop
levels, per SIMD level, block GEMM on and off: how the time under drops
compares with no drop where partitions are narrow (the built-in models'
experts have 40 and 160 neurons).

    python benchmarks/bench_partitions.py                         # built-in olmoe's MoE shape
    python benchmarks/bench_partitions.py --shape 8,192,160,2048,2 --partitions 4   # built-in mixtral's, P = 4

Levels are drawn at random per (token, slot): 1T drops --rate of the pairs;
2T (P partitions) drops half of --rate and spreads --rate over the partial
levels 1 .. P-1.  Prints medians over interleaved rounds with their
interquartile range, and each time over no drop in the same rounds.  The
narrow-partition rule of the engine (csrc/core/ds_moe.c, DS_SEG_MIN) is a
compile-time constant: build with DUALSPARSE_CFLAGS=-DDS_SEG_MIN=0 for the
segments everywhere.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32,192,40,2048,4",
                   help="E,H,I,T,K: experts, hidden size, neurons per expert, tokens, top-k (default: built-in olmoe)")
    p.add_argument("--partitions", type=int, default=2, help="P of the 2T levels (default 2)")
    p.add_argument("--rate", type=float, default=0.10, help="share of pairs touched by the drops (default 0.10)")
    p.add_argument("--simd", default="", help="comma-separated SIMD levels (default: the CPU's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    try:
        E, H, I, T, K = (int(v) for v in a.shape.split(","))
    except ValueError:
        p.error(f"--shape must be five integers E,H,I,T,K; got {a.shape!r}")
    if not (1 <= K <= E and min(H, I, T) >= 1):
        p.error(f"--shape needs 1 <= K <= E and H, I, T >= 1; got {a.shape!r}")
    if not 2 <= a.partitions <= I:
        p.error(f"--partitions must be in [2, I={I}]; got {a.partitions}")
    if not 0.0 < a.rate <= 0.5:
        p.error(f"--rate must be in (0, 0.5]; got {a.rate}")
    if a.rounds < 3:
        p.error(f"--rounds must be at least 3; got {a.rounds}")

    import torch
    from dualsparse import ops

    dt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dt)
    dn = (torch.randn(E, H, I, generator=g) * 0.1).to(dt)
    x = torch.randn(T, H, generator=g).to(dt)
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), K, -1)
    ids = ids.to(torch.int32)
    u = torch.rand(T, K, generator=g)
    P, r = a.partitions, a.rate
    lv1 = torch.ones(T, K, dtype=torch.int8)
    lv1[u < r] = 0
    lv2 = torch.full((T, K), P, dtype=torch.int8)
    part = (u >= r / 2) & (u < r)  # levels 1 .. P-1, evenly over [r/2, r)
    lv2[part] = (1 + ((u[part] - r / 2) / (r / 2) * (P - 1)).floor().clamp(max=P - 2)).to(torch.int8)
    lv2[u < r / 2] = 0
    out = torch.empty(T, H, dtype=dt)
    nt = a.threads or torch.get_num_threads()
    cases = {"no drop": (None, 1), "1T": (lv1, 1), f"2T P={P}": (lv2, P)}
    levels = [s for s in a.simd.split(",") if s] or [ops.simd_level()]
    print(f"shape E={E} H={H} I={I} T={T} K={K}, {a.dtype}, {nt} threads; 1T drops {r:.0%} of the pairs, "
          f"2T drops {r / 2:.0%} and keeps levels 1..{P - 1} of {P} for {r / 2:.0%}; {a.rounds} interleaved rounds")
    print("level | block GEMM | " + " | ".join(f"{k} ms [IQR]" for k in cases) + " | 1T / no drop | 2T / no drop")
    saved = ops.simd_level(), ops.block_gemm()
    try:
        for lvl in levels:
            ops.set_simd_level(lvl)
            for on in (True, False):
                ops.set_block_gemm(on)
                res = {k: [] for k in cases}
                for lv, PP in cases.values():  # warm-up
                    ops.moe_experts(x, ids, w, gu, dn, levels=lv, num_partitions=PP, out=out, num_threads=nt)
                for _ in range(a.rounds):
                    for k, (lv, PP) in cases.items():
                        t0 = time.perf_counter()
                        ops.moe_experts(x, ids, w, gu, dn, levels=lv, num_partitions=PP, out=out, num_threads=nt)
                        res[k].append(time.perf_counter() - t0)
                cells, med = [], {}
                for k, v in res.items():
                    q = statistics.quantiles(v, n=4)
                    med[k] = statistics.median(v)
                    cells.append(f"{med[k] * 1e3:.3f} [{q[0] * 1e3:.3f}-{q[2] * 1e3:.3f}]")
                base = med["no drop"]
                rat = [med[k] / base for k in list(cases)[1:]]
                print(f"{lvl} | {'on' if on else 'off'} | " + " | ".join(cells) + " | " +
                      " | ".join(f"{v:.3f}" for v in rat), flush=True)
    finally:
        ops.set_simd_level(saved[0])
        ops.set_block_gemm(saved[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

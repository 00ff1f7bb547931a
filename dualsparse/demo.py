"""`python -m dualsparse demo`: the engine on a realistic MoE layer.

Builds one MoE layer with the expert shapes of a real model (random weights,
routing from a softmax over skewed random logits, as trained routers give),
then runs the engine at no drop and under 1T-/2T-Drop thresholds that drop a
range of expert computation, for a decode step and a prefill batch, and
prints, per policy: the drop rate, the median time, the speedup over no drop
against the ideal 1/(1 - drop), and the relative output error against no
drop.  Patches no model.
"""
from __future__ import annotations

import statistics
import time

SHAPES = {
    "olmoe": dict(H=2048, I=1024, E=64, K=8, renorm=False),
    "mixtral": dict(H=4096, I=14336, E=8, K=2, renorm=True),
    "qwen3-30b": dict(H=2048, I=768, E=128, K=8, renorm=True),
    "small": dict(H=512, I=256, E=16, K=4, renorm=False),
}


def add_arguments(p):
    p.add_argument("--shape", choices=sorted(SHAPES), default="olmoe",
                   help="expert shapes of this model (default: olmoe = OLMoE-1B-7B)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512],
                   help="tokens per batch; one table each (default: 1 = decode, 512 = prefill)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per policy (median reported)")
    p.add_argument("--seed", type=int, default=0)


def _routing(torch, T, E, K, renorm, gen):
    # Trained routers are confident on some tokens and flat on others: a
    # per-token temperature spreads the top-k score distribution the way
    # real models do.
    logits = torch.randn(T, E, generator=gen) * (0.5 + 2.5 * torch.rand(T, 1, generator=gen))
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, K, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return ids, w


def run(args) -> int:
    try:
        import torch
    except ImportError:
        print("the demo needs torch: pip install 'dualsparse[torch]'")
        return 1
    from . import ops

    s = SHAPES[args.shape]
    H, I, E, K = s["H"], s["I"], s["E"], s["K"]
    if any(t < 1 for t in args.tokens):
        print("--tokens must be >= 1")
        return 2
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"building a {args.shape} MoE layer: E={E} experts, top-{K}, H={H}, I={I}, {args.dtype} "
          f"({E * 3 * H * I * (2 if dtype == torch.bfloat16 else 4) / 2**30:.2f} GiB of expert weights)")
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    nt = args.threads or torch.get_num_threads()
    print(f"engine: SIMD {ops.simd_level()}, {nt} thread(s); median of {args.repeats} runs")
    for T in args.tokens:
        _table(torch, ops, args, T, H, I, E, K, s["renorm"], gate_up, down, dtype, nt, gen)
    print("\nspeedup = time(no drop) / time(policy); ideal = 1 / (1 - drop rate).  Dropped work becomes\n"
          "saved time where the arithmetic dominates (prefill) or where each token reads its own experts\n"
          "(decode).  In between (a few dozen tokens on many experts) nearly every expert's weights must\n"
          "still be read, and memory traffic, not arithmetic, sets the time.")
    return 0


def _table(torch, ops, args, T, H, I, E, K, renorm, gate_up, down, dtype, nt, gen):
    x = torch.randn(T, H, generator=gen).to(dtype)
    # decode draws several independent tokens so that a drop rate is realised
    reps = max(1, min(32, 256 // (T * K)))
    routes = [_routing(torch, T, E, K, renorm, gen) for _ in range(reps)]

    def timed(levels_list, P):
        outs = [ops.moe_experts(x, ids, w, gate_up, down, levels=lv, num_partitions=P, num_threads=nt)
                for (ids, w), lv in zip(routes, levels_list)]
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for (ids, w), lv, out in zip(routes, levels_list, outs):
                ops.moe_experts(x, ids, w, gate_up, down, levels=lv, num_partitions=P, num_threads=nt, out=out)
            ts.append((time.perf_counter() - t0) / reps)
        return outs, statistics.median(ts)

    ref, t_ref = timed([None] * reps, 1)
    rows = [("no drop", "-", 0.0, t_ref, 1.0, 1.0, 0.0)]
    shat = torch.cat([w / w.sum(-1, keepdim=True) for _, w in routes]).flatten().float()
    q = torch.quantile(shat, torch.tensor([0.1, 0.25, 0.4]))
    for t in q.tolist():
        for kind, thr in (("1T", [t]), ("2T", [t - 0.01, t + 0.01])):
            if thr[0] <= 0:
                thr = [t * 0.8, t * 1.2]
            lvs = [ops.route_levels(w, thr) for _, w in routes]
            P = len(thr)
            drop = 1.0 - sum(lv.double().sum().item() for lv in lvs) / (P * sum(lv.numel() for lv in lvs))
            outs, tm = timed(lvs, P)
            err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, ref))
            rows.append((kind, "/".join(f"{v:.3f}" for v in thr), drop, tm, t_ref / tm, 1 / (1 - drop), err))
    print(f"\nT = {T} token{'s' if T > 1 else ''} per call" + (f" ({reps} routings averaged)" if reps > 1 else ""))
    head = f"{'policy':<8} {'thresholds':>12} {'drop':>7} {'time ms':>9} {'speedup':>8} {'ideal':>6} {'rel. error':>11}"
    print(head)
    print("-" * len(head))
    for kind, thr, drop, tm, sp, ideal, err in rows:
        print(f"{kind:<8} {thr:>12} {drop:>7.1%} {tm * 1e3:>9.2f} {sp:>7.2f}x {ideal:>5.2f}x {err:>11.2e}")

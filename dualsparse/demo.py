"""`python -m dualsparse demo`: the engine on a realistic MoE layer.

Builds one MoE layer with the expert shapes of a real model (random weights,
routing from a softmax over skewed random logits, as trained routers give),
then runs the engine at no drop and under 1T-/2T-Drop thresholds that drop a
range of expert computation, and prints, per policy: the drop rate, the
median time, the speedup over no drop against the ideal 1/(1 - drop), and the
relative output error against no drop.  Patches no model.
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
    p.add_argument("--tokens", type=int, default=128, help="tokens in the batch (default 128)")
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
    T = args.tokens
    if T < 1:
        print("--tokens must be >= 1")
        return 2
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"building a {args.shape} MoE layer: E={E} experts, top-{K}, H={H}, I={I}, {args.dtype}, "
          f"T={T} tokens ({E * 3 * H * I * (2 if dtype == torch.bfloat16 else 4) / 2**30:.2f} GiB of expert weights)")
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids, w = _routing(torch, T, E, K, s["renorm"], gen)
    nt = args.threads or torch.get_num_threads()
    shat = w / w.sum(-1, keepdim=True)

    def timed(levels, P):
        out = ops.moe_experts(x, ids, w, gate_up, down, levels=levels, num_partitions=P, num_threads=nt)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ops.moe_experts(x, ids, w, gate_up, down, levels=levels, num_partitions=P, num_threads=nt, out=out)
            ts.append(time.perf_counter() - t0)
        return out, statistics.median(ts)

    ref, t_ref = timed(None, 1)
    rows = [("no drop", "-", 0.0, t_ref, 1.0, 1.0, 0.0)]
    q = torch.quantile(shat.flatten().float(), torch.tensor([0.1, 0.25, 0.4]))
    for frac, t in zip((0.1, 0.25, 0.4), q.tolist()):
        for kind, thr in (("1T", [t]), ("2T", [t - 0.01, t + 0.01])):
            if thr[0] <= 0:
                thr = [t * 0.8, t * 1.2]
            lv = ops.route_levels(w, thr)
            P = len(thr)
            drop = 1.0 - lv.double().sum().item() / (P * lv.numel())
            out, tm = timed(lv, P)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            rows.append((kind, "/".join(f"{v:.3f}" for v in thr), drop, tm, t_ref / tm, 1 / (1 - drop), err))
    print(f"\nengine: SIMD {ops.simd_level()}, {nt} thread(s); median of {args.repeats} runs\n")
    head = f"{'policy':<8} {'thresholds':>12} {'drop':>7} {'time ms':>9} {'speedup':>8} {'ideal':>6} {'rel. error':>11}"
    print(head)
    print("-" * len(head))
    for kind, thr, drop, tm, sp, ideal, err in rows:
        print(f"{kind:<8} {thr:>12} {drop:>7.1%} {tm * 1e3:>9.2f} {sp:>7.2f}x {ideal:>5.2f}x {err:>11.2e}")
    print("\nspeedup = time(no drop) / time(policy); ideal = 1 / (1 - drop rate).")
    return 0

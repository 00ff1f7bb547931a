"""End-to-end forward speed of a patched Hugging Face MoE model.

Builds a transformers MoE model from a config with realistic layer widths
(random weights, no download), and measures, side by side in one process:
the unpatched model (its default experts implementation), the patched model
at no drop, and the patched model under 2T-Drop thresholds found for about
25% drop.  Reports prefill tokens/s (one batch of --seq tokens) and decode
tokens/s (greedy generation with the KV cache), medians of --repeats runs,
and the MoE-module share of the time.

    python benchmarks/bench_e2e.py                      # OLMoE-like, bf16
    python benchmarks/bench_e2e.py --family mixtral --dtype float32

Writes JSON next to --out (default bench-results/).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench_experts import timeit as timed  # warm-up, then the median of repeats

CONFIGS = {
    # OLMoE-1B-7B layer widths (H=2048, I=1024, 64 experts, top-8), 4 layers
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(vocab_size=8192, hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, norm_topk_prob=False,
                   max_position_embeddings=4096, pad_token_id=1, eos_token_id=2)),
    # Mixtral-8x7B widths are 350 MB per expert in bf16: a 1-layer model
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(vocab_size=8192, hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                     num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=4096)),
    # Qwen3-30B-A3B widths (H=2048, I=768, 128 experts, top-8), 4 layers
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(vocab_size=8192, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=4, head_dim=128, norm_topk_prob=True, max_position_embeddings=4096)),
}


def build(family, dtype, seed=0):
    import transformers

    cfg_name, cls_name, kw = CONFIGS[family]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = getattr(transformers, cls_name)(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():  # routers with a trained-looking spread of scores
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.normal_(0.0, 0.05)
    return model


def moe_time_hooks(model):
    """Forward pre/post hooks on every MoE block accumulating wall time."""
    total = [0.0]
    starts = {}
    handles = []
    for name, mod in model.named_modules():
        if hasattr(mod, "experts") and (hasattr(mod, "gate") or hasattr(mod, "router")):
            handles.append(mod.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o: total.__setitem__(0, total[0] + time.perf_counter() - starts.pop(id(m)))))
    return total, handles


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(CONFIGS), default="olmoe")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seq", type=int, default=256, help="prefill tokens (batch 1)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.25, help="drop rate for the 2T policy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)

    import dualsparse as ds
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.family, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (1, args.seq), generator=g)
    calib = [torch.randint(3, vocab, (2, 128), generator=g) for _ in range(4)]
    step_prompt = prompt[:, :32]

    def prefill():
        with torch.no_grad():
            model(prompt, use_cache=False)

    def decode():
        with torch.no_grad():
            model.generate(step_prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)

    moe_total, _ = moe_time_hooks(model)
    rows = []

    def measure(label, policy_desc, drop):
        moe_total[0] = 0.0
        t_pre = timed(prefill, args.repeats)
        moe_pre = moe_total[0] / (args.repeats + 1)
        t_dec = timed(decode, max(2, args.repeats // 2))
        rows.append(dict(config=label, policy=policy_desc, drop=drop, prefill_s=t_pre,
                         prefill_tok_s=args.seq / t_pre, moe_prefill_s=moe_pre,
                         decode_s=t_dec, decode_tok_s=args.new_tokens / t_dec))
        print(f"  {label:<22} {policy_desc:<34} drop {drop:6.1%}  prefill {args.seq / t_pre:8.1f} tok/s "
              f"(MoE {moe_pre * 1e3:7.1f} ms of {t_pre * 1e3:7.1f})  decode {args.new_tokens / t_dec:6.1f} tok/s",
              flush=True)

    impl = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") else "eager loop"
    print(f"{args.family} widths, {args.dtype}, {torch.get_num_threads()} threads, transformers "
          f"{transformers.__version__}, prefill {args.seq} tokens, decode {args.new_tokens} tokens")
    measure(f"unpatched ({impl})", "-", 0.0)
    ds.patch(model, ds.NoDrop(), num_threads=args.threads)
    measure("patched", "NoDrop", 0.0)
    policy = ds.find_thresholds(model, calib, args.target, kind="2t", show_progress=False)
    ds.set_policy(model, policy)
    ds.reset_stats(model)
    prefill()
    drop = ds.drop_stats(model).overall
    measure("patched", policy.describe(), drop)
    base = rows[0]
    for r in rows:
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        r["moe_speedup"] = base["moe_prefill_s"] / r["moe_prefill_s"] if r["moe_prefill_s"] else None
        r["decode_speedup"] = base["decode_s"] / r["decode_s"]
    print("\n| config | policy | drop | prefill tok/s | speedup | MoE speedup | decode tok/s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['policy']} | {r['drop']:.1%} | {r['prefill_tok_s']:.1f} | {r['prefill_speedup']:.2f}x "
              f"| {r['moe_speedup']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_e2e_{args.family}_{args.dtype}_tf{transformers.__version__}.json"
    path.write_text(json.dumps({"args": vars(args), "machine": platform.processor() or platform.machine(),
                                "torch": torch.__version__, "transformers": transformers.__version__,
                                "rows": rows}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

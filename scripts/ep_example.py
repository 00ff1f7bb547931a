"""Expert parallelism over CPU processes on one machine (gloo).

    torchrun --nproc-per-node 2 scripts/ep_example.py                 # the built-in OLMoE-style model
    torchrun --nproc-per-node 4 scripts/ep_example.py --model mixtral --t-max 0.2
    torchrun --nproc-per-node 4 scripts/ep_example.py --model path/to/hf_model --sub-experts 2

Every rank loads the same model, patches it with the same policy and
``expert_parallel=True``, and runs its own tokens; the MoE layers exchange
token rows with all-to-all.  Rank 0 prints the per-rank loads, and each rank
checks its logits against the same model run in its own process without
expert parallelism (same policy, uniform thresholds).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dualsparse as ds  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe",
                    help="a built-in model name (olmoe, mixtral) or a local Hugging Face model folder (default olmoe)")
    ap.add_argument("--sub-experts", type=int, default=1, help="S-ETP: sub-experts per expert on different ranks")
    ap.add_argument("--t-max", type=float, default=0.1,
                    help="1T-Drop threshold, the load-aware maximum (default 0.1, for top-4 scores; 0.2 suits top-2)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    args = ap.parse_args()

    torch.set_num_threads(1)                       # one core per rank
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()

    from dualsparse import builtin
    from dualsparse.text import paragraphs, read_text

    model, tok = builtin.load_model(args.model)    # the same weights on every rank (float32)
    # each rank its own tokens: paragraphs rank, rank + world, ... of the held-out text
    paras = paragraphs(read_text(builtin.heldout_path()))[rank::world]
    ids = tok(" ".join(paras[:20]), return_tensors="pt", verbose=False)["input_ids"][:, : args.tokens]

    base = ds.OneThreshold(args.t_max)
    ep = ds.ExpertParallel(sub_experts=args.sub_experts, timeout=60)
    handle = ds.patch(model, base, num_threads=1, expert_parallel=ep)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    uniform = ds.ep_stats(model)

    ds.set_policy(model, ds.LoadAware(base))       # collective: every rank sets the same policy
    ds.reset_stats(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    aware = ds.ep_stats(model)
    fill = None
    if args.sub_experts == 1:                      # the fill rule needs plain EP
        ds.set_policy(model, ds.LoadAware(base, rule="fill"))
        ds.reset_stats(model)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        fill = ds.ep_stats(model)

    handle.revert()                                # the same model in this process alone
    ds.patch(model, base, num_threads=1)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    err = (out - ref).abs().max().item()
    # each rank writes its lines in one write (atomic on a pipe below 4 KiB),
    # so the ranks' outputs never interleave mid-line
    lines = []
    if rank == 0:
        lines.append(f"{world} ranks, sub_experts={args.sub_experts}, T_max={args.t_max}")
        for name, st in (("uniform", uniform), ("ratio", aware), ("fill", fill)):
            if st is None:
                continue
            lines.append(f"  {name:10s}: drop {st.drop_rate:.1%}, load after per rank "
                         f"{st.load_after.sum(0).round(1)}, max/mean per layer {st.max_load_ratio_after.round(3)}")
    lines.append(f"  rank {rank}: max |EP logits - single-process logits| = {err:.2e}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Expert parallelism on CPU processes: maximum rank load, MoE-layer time and
next-token accuracy under uniform and load-aware thresholds, with
deliberately skewed routing.

    python benchmarks/bench_ep.py                      # launches torchrun for 2 and 4 ranks
    python benchmarks/bench_ep.py --ranks 2 --model path/to/hf_model --text heldout.txt.gz
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --worker ...   # one world size, by hand

Every rank runs its own batches of held-out text (data parallel outside the
MoE layers); the MoE layers run expert parallel over gloo.  Routing is skewed
by adding ``--skew`` to the router logits of the first quarter of the
experts (all on rank 0 with the contiguous placement), so rank 0 is the
most loaded one.  Reported per policy: drop rate, maximum rank load (sum over
layers and forwards of the most loaded rank's expert units, relative to no
drop: what sets the MoE time), max/mean load ratio, the expert computation's
CPU time of the slowest rank in each layer, summed over layers, per forward
(CPU time does not count waiting, so it follows the load even when ranks
share cores: the measured counterpart of the maximum rank load), the MoE-layer
wall time per forward (mean over ranks, including the exchanges), and
next-token accuracy on the text over all ranks' tokens (top-1 agreement
with the no-drop model is reported too).

Model: ``--model`` (a local Hugging Face folder with its tokenizer), else
the built-in OLMoE-style model ``dualsparse.builtin.load("olmoe")`` when
this installation has it, else a randomly initialised OLMoE-shaped model on
random tokens (accuracy is then meaningless: read the agreement column).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to launch (default 2 4)")
    ap.add_argument("--model", default=None, help="local Hugging Face model folder (default: built-in olmoe)")
    ap.add_argument("--text", default=None, help="held-out text (.txt or .txt.gz); default: the built-in one")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward on each rank")
    ap.add_argument("--forwards", type=int, default=3, help="measured forwards per policy on each rank")
    ap.add_argument("--skew", type=float, default=1.0, help="router logit bias on the first quarter of the experts")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1],
                    help="T_max values (1T-Drop) to compare (default 0.05 0.1, suited to top-4 routing; "
                         "0.1 0.2 suit top-2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench-results", help="folder for bench_ep_<world>.json")
    ap.add_argument("--worker", action="store_true", help="run as one rank (under torchrun)")
    return ap.parse_args()


# ------------------------------------------------------------------ launcher

def launch(args):
    os.makedirs(args.out, exist_ok=True)
    passthrough = [a for a in sys.argv[1:]]
    results = {}
    for world in args.ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={port}", os.path.abspath(__file__), "--worker", *passthrough]
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
        print(f"# {world} ranks: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        with open(os.path.join(args.out, f"bench_ep_{world}.json")) as f:
            results[world] = json.load(f)
    print()
    for r in results.values():
        print(table(r))
        print()


def table(r):
    lines = [f"### {r['world']} ranks: {r['model']}, skew {r['skew']}, {r['tokens_per_rank']} tokens per rank "
             f"per forward, {r['forwards']} forwards",
             "",
             "| policy | drop rate | max rank load (rel. no drop) | max/mean load | expert CPU ms, slowest rank per layer | "
             "MoE wall ms | next-token acc. | agreement w/ no drop |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['policy']} | {row['drop_rate']:.1%} | {row['max_load_rel']:.3f} | "
                     f"{row['max_mean_ratio']:.3f} | {row['expert_cpu_ms_critical']:.1f} | {row['moe_ms']:.1f} | "
                     f"{row['accuracy']:.4f} | {row['agreement']:.4f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ worker

def load_model(args):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype).eval()
        return m, AutoTokenizer.from_pretrained(args.model, local_files_only=True), args.model
    try:
        from dualsparse import builtin

        m, tok = builtin.load("olmoe", dtype=dtype)
        return m, tok, "built-in olmoe"
    except (ImportError, FileNotFoundError):
        pass
    import transformers

    cfg = transformers.OlmoeConfig(vocab_size=4096, hidden_size=192, intermediate_size=40, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=6, num_experts=32,
                                   num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=512)
    torch.manual_seed(0)
    m = transformers.OlmoeForCausalLM(cfg).eval()
    with torch.no_grad():   # router logits of about unit spread (the default init makes routing near uniform)
        for name, p in m.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.1)
    m = m.to(dtype)
    return m, None, "random OLMoE-shaped (32 experts, top-4), random tokens"


def token_batches(args, tok, vocab, rank, world, n):
    import torch

    need = n * args.batch * (args.seq + 1) * world
    if tok is None:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab, (need,), generator=g)
    else:
        path = args.text
        if path is None:
            from dualsparse import builtin

            path = str(builtin.heldout_path())
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        ids = torch.tensor(tok(text[: max(need * 8, 200000)])["input_ids"], dtype=torch.long)
        if ids.numel() < need:
            raise SystemExit(f"bench_ep: {path} gives {ids.numel()} tokens; {need} needed")
    ids = ids[:need].view(world, n, args.batch, args.seq + 1)[rank]
    return [b for b in ids]


def worker(args):
    import torch
    import torch.distributed as dist

    import dualsparse as ds
    from dualsparse.hf.expert_parallel import add_router_bias
    from dualsparse.hf.families import num_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tok, name = load_model(args)
    E = num_experts(model.config)
    bias = [args.skew if e < max(1, E // 4) else 0.0 for e in range(E)]
    add_router_bias(model, bias)
    h = ds.patch(model, ds.NoDrop(), num_threads=1, expert_parallel=ds.ExpertParallel(timeout=120))
    ep = h.ep
    moe_time = [0.0]
    inner = ep.run

    def timed(layer, x, ids, w):
        t0 = time.perf_counter()
        try:
            return inner(layer, x, ids, w)
        finally:
            moe_time[0] += time.perf_counter() - t0

    ep.run = timed
    batches = token_batches(args, tok, model.config.vocab_size, rank, world, args.forwards + 1)
    policies = [("no drop", ds.NoDrop())]
    for t in args.thresholds:
        base = ds.OneThreshold(t)
        policies += [(f"uniform T={t:g}", base), (f"load-aware ratio, T_max={t:g}", ds.LoadAware(base)),
                     (f"load-aware fill, T_max={t:g}", ds.LoadAware(base, rule="fill"))]
    rows, ref_top = [], None
    for label, pol in policies:
        ds.set_policy(model, pol)
        with torch.no_grad():
            model(input_ids=batches[0][:, :-1], use_cache=False)   # warm-up
        ds.reset_stats(model)
        moe_time[0] = 0.0
        ep.cpu_log = []
        correct = agree = count = 0
        tops = []
        with torch.no_grad():
            for i, b in enumerate(batches[1:]):
                top = model(input_ids=b[:, :-1], use_cache=False).logits.argmax(-1)
                tops.append(top)
                correct += int((top == b[:, 1:]).sum())
                count += top.numel()
                if ref_top is not None:
                    agree += int((top == ref_top[i]).sum())
        if ref_top is None:
            ref_top, agree = tops, count
        st = ds.ep_stats(model)
        local = torch.tensor([correct, agree, count, moe_time[0]], dtype=torch.float64)
        dist.all_reduce(local)
        # per layer call, the slowest rank's expert CPU time, summed: the compute on the critical path
        mine = torch.tensor(ep.cpu_log, dtype=torch.float64)
        logs = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(logs, mine)
        logs = torch.stack(logs)                                   # (ranks, layer calls)
        cpu_crit = float(logs.max(0).values.sum()) / args.forwards * 1e3
        cpu = (logs.sum(1) / args.forwards * 1e3).tolist()
        rows.append(dict(policy=label, drop_rate=st.drop_rate, max_load=st.total_max_load_after,
                         max_mean_ratio=float(st.max_load_after.sum() / (st.load_after.sum() / world)),
                         load_after_per_rank=st.load_after.sum(0).tolist(),
                         threshold_scale=st.threshold_scale.mean(0).tolist(),
                         moe_ms=float(local[3]) / world / args.forwards * 1e3,
                         expert_cpu_ms_per_rank=cpu, expert_cpu_ms_critical=cpu_crit,
                         accuracy=float(local[0] / local[2]), agreement=float(local[1] / local[2])))
    base_max = rows[0]["max_load"]
    for r in rows:
        r["max_load_rel"] = r["max_load"] / base_max
    if rank == 0:
        res = dict(world=world, model=name, skew=args.skew, tokens_per_rank=args.batch * args.seq,
                   forwards=args.forwards, experts=E, top_k=int(model.config.num_experts_per_tok),
                   torch=torch.__version__, rows=rows)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"bench_ep_{world}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(table(res), flush=True)
    dist.destroy_process_group()


def main():
    args = parse()
    if args.worker or "RANK" in os.environ:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()

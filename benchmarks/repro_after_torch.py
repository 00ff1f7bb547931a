#!/usr/bin/env python
"""Reproducer: the engine runs slower right after a torch (OpenMP) op.

After a parallel torch op, libgomp keeps torch's worker thread spinning for a
few milliseconds; on a 2-core machine it takes a core from the engine's two
threads.  Times one OLMoE-shaped moe_experts call (T=16 by default) right after
another engine call, after transformers' grouped_mm experts forward, after a
tiny torch matmul, and after a 5 ms sleep.  With OMP_WAIT_POLICY=PASSIVE (or
GOMP_SPINCOUNT=0) the difference disappears.

    python benchmarks/repro_after_torch.py [bfloat16|float32] [T]
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_experts import import_engine, make_routing  # noqa: E402

_, ops = import_engine()
from transformers import OlmoeConfig  # noqa: E402
from transformers.integrations import moe as hfmoe  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts  # noqa: E402

torch.set_num_threads(2)
H, I, E, K = 2048, 1024, 64, 8
dt = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
T = int(sys.argv[2]) if len(sys.argv) > 2 else 16
g = torch.Generator().manual_seed(0)
gu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dt)
dn = (torch.randn(E, H, I, generator=g) / I**0.5).to(dt)
ids, w = make_routing(torch, T, E, K, False, 16000)
w = w.to(dt)
x = torch.randn(T, H, generator=g).to(dt)
out = torch.empty_like(x)
cfg = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K)
with torch.device("meta"):
    ex = OlmoeExperts(cfg)
ex.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
ex.down_proj = torch.nn.Parameter(dn, requires_grad=False)


def eng():
    return ops.moe_experts(x, ids, w, gu, dn, out=out, num_threads=2)


a = torch.randn(256, 256).to(dt)
pre = {
    "after engine": eng,
    "after HF grouped_mm": lambda: hfmoe.grouped_mm_experts_forward(ex, x, ids, w),
    "after a tiny torch matmul (256^2)": lambda: a @ a,
    "after sleep 5 ms": lambda: time.sleep(0.005),
}
ts = {k: [] for k in pre}
with torch.inference_mode():
    for k, f in pre.items():
        f()
        eng()
    for r in range(25):
        for k, f in pre.items():
            f()
            t0 = time.perf_counter()
            eng()
            ts[k].append(time.perf_counter() - t0)
print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
for k in pre:
    print(f"engine {dt} T={T} {k:<36} {statistics.median(ts[k]) * 1e3:7.2f} ms")

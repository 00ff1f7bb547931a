"""One rank of the expert-parallel tests (tests/test_ep.py starts WORLD_SIZE
of these on loopback with gloo).  ``python ep_worker.py SCENARIO OUTDIR``;
each rank writes what the test checks to OUTDIR/<scenario>_rank<r>.pt.

Each rank runs its own tokens (different lengths per rank) through the tiny
models of tests/hf_models.py; the parent recomputes the references in one
process."""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dualsparse as ds  # noqa: E402
from dualsparse.hf.expert_parallel import add_router_bias  # noqa: E402
from dualsparse.hf.families import num_experts  # noqa: E402
from hang import HANG_S  # noqa: E402
from hf_models import build, input_ids  # noqa: E402

FAMILIES = ("mixtral", "olmoe", "qwen2_moe")
# collectives between healthy ranks: on a busy machine one rank can lag far
# behind another (building models, importing), so only a hang may time out
HEALTHY = min(HANG_S, 600.0)


def skewed(family):
    """The tiny model with deliberately skewed routing: router logit bias
    +1.5 on expert 0 and +0.5 on expert 1, which overloads the rank(s)
    holding them."""
    model = build(family)
    E = num_experts(model.config)
    add_router_bias(model, [1.5, 0.5] + [0.0] * (E - 2))
    return model


def rank_tokens(rank, seq=None):
    return input_ids(batch=2, seq=seq or (9 + 3 * rank), seed=100 + rank)


def one_token(rank):
    return input_ids(batch=1, seq=1, seed=200 + rank)


def policies(family):
    """(drop policy, load-aware policy) used per family."""
    if family == "olmoe":
        base = ds.TwoThreshold(0.3, 0.4)
    else:
        base = ds.OneThreshold(0.35)
    return base, ds.LoadAware(base)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def uneven_all_to_all(rank, world):
    """gloo's all_to_all_single with uneven (and zero) split sizes: rank r
    sends r + d rows of value 100*r + d to rank d."""
    send_counts = [rank + d for d in range(world)]
    recv_counts = [s + rank for s in range(world)]
    send = torch.cat([torch.full((n, 2), 100.0 * rank + d) for d, n in enumerate(send_counts)])
    recv = torch.empty((sum(recv_counts), 2))
    dist.all_to_all_single(recv, send, recv_counts, send_counts)
    return recv


def scenario_main(rank, world, out):
    res = {"uneven_all_to_all": uneven_all_to_all(rank, world)}
    for fam in FAMILIES:
        ids = rank_tokens(rank)
        base, la = policies(fam)
        model = skewed(fam)
        h = ds.patch(model, ds.NoDrop(), num_threads=1, expert_parallel=ds.ExpertParallel(timeout=HEALTHY))
        r = {"nodrop": logits(model, ids)}
        ds.set_policy(model, base)
        ds.reset_stats(model)
        h.ep.trace = []
        r["uniform"] = logits(model, ids)
        r["uniform_trace"], r["uniform_stats"] = h.ep.trace, ds.ep_stats(model)
        r["uniform_drop"] = ds.drop_stats(model)
        ds.set_policy(model, la)
        ds.reset_stats(model)
        h.ep.trace = []
        r["load_aware"] = logits(model, ids)
        r["la_trace"], r["la_stats"] = h.ep.trace, ds.ep_stats(model)
        ds.set_policy(model, ds.LoadAware(base, rule="fill", steps=64))
        ds.reset_stats(model)
        h.ep.trace = []
        r["fill"] = logits(model, ids)
        r["fill_trace"], r["fill_stats"] = h.ep.trace, ds.ep_stats(model)
        h.revert()
        # S-ETP: two sub-experts per expert on different ranks, same policies
        model = skewed(fam)
        h = ds.patch(model, ds.NoDrop(), num_threads=1,
                     expert_parallel=ds.ExpertParallel(sub_experts=2, timeout=HEALTHY))
        r["setp_nodrop"] = logits(model, ids)
        ds.set_policy(model, base)
        ds.reset_stats(model)
        h.ep.trace = []
        r["setp_uniform"] = logits(model, ids)
        r["setp_trace"], r["setp_stats"] = h.ep.trace, ds.ep_stats(model)
        ds.set_policy(model, la)
        ds.reset_stats(model)
        h.ep.trace = []
        r["setp_la"] = logits(model, ids)
        r["setp_la_trace"], r["setp_la_stats"] = h.ep.trace, ds.ep_stats(model)
        h.revert()
        res[fam] = r
    # edge cases on one model: a single token per rank (ranks receive one row or none) and every pair dropped
    model = skewed("olmoe")
    ds.patch(model, ds.NoDrop(), num_threads=1, expert_parallel=ds.ExpertParallel(timeout=HEALTHY))
    res["one_token"] = logits(model, one_token(rank))
    ds.set_policy(model, ds.OneThreshold(1.01))
    res["drop_all"] = logits(model, rank_tokens(rank))
    return res


def scenario_mismatch(rank, world, out):
    res = {}
    ep = ds.ExpertParallel(timeout=HEALTHY)
    # experts not divisible by the world size (3 experts on 2 ranks): raised before any collective
    try:
        ds.patch(build("mixtral", num_local_experts=3), expert_parallel=ep)
    except ValueError as e:
        res["indivisible"] = str(e)
    # different policies on the ranks: the handshake fails on every rank
    try:
        ds.patch(build("olmoe"), ds.OneThreshold(0.2 + 0.1 * rank), expert_parallel=ep)
    except ds.ExpertParallelError as e:
        res["policy"] = str(e)
    # different sub_experts
    try:
        ds.patch(build("olmoe"), expert_parallel=ds.ExpertParallel(sub_experts=1 + rank, timeout=HEALTHY))
    except ds.ExpertParallelError as e:
        res["sub_experts"] = str(e)
    # different model shapes (a rank with another top-k)
    try:
        ds.patch(build("olmoe", num_experts_per_tok=2 + rank), expert_parallel=ep)
    except ds.ExpertParallelError as e:
        res["config"] = str(e)
    return res


def scenario_exit_after_patch(rank, world, out):
    model = build("olmoe")
    h = ds.patch(model, num_threads=1, expert_parallel=ds.ExpertParallel(timeout=HEALTHY))
    h.ep.timeout = datetime.timedelta(seconds=5)   # the forward's collectives: the peer is gone
    if rank == world - 1:
        torch.save({"exited": True}, os.path.join(out, f"exit_after_patch_rank{rank}.pt"))
        os._exit(0)          # a rank that dies between patch and forward
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        logits(model, rank_tokens(rank))
    except ds.ExpertParallelError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def scenario_absent_at_patch(rank, world, out):
    done = os.path.join(out, "absent_at_patch_done")
    if rank == world - 1:     # never patches; stays (so the others time out, not see it leave) until they are done
        torch.save({"absent": True}, os.path.join(out, f"absent_at_patch_rank{rank}.pt"))
        deadline = time.monotonic() + HANG_S
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    model = build("olmoe")
    t0 = time.monotonic()
    try:
        ds.patch(model, expert_parallel=ds.ExpertParallel(timeout=2))
        res = {"error": None}
    except ds.ExpertParallelError as e:
        res = {"error": str(e)}
    res["seconds"] = time.monotonic() - t0
    open(done, "w").close()
    return res


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    # gloo's own timeout (rendezvous, barriers) is the hang bound; the tests of
    # timeouts use ExpertParallel(timeout=...) far below it
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=HANG_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        res = globals()[f"scenario_{scenario}"](rank, world, out)
        torch.save(res, os.path.join(out, f"{scenario}_rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    if scenario not in ("exit_after_patch", "absent_at_patch"):   # those have a dead member
        dist.barrier()
    # leave without the process group's C++ teardown: gloo can abort a rank
    # ("terminate called without an active exception") when its peer has
    # already closed the connection, which says nothing about the code tested
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

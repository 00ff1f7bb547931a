"""Expert parallelism (EP) for patched MoE layers on ``torch.distributed``.

Every rank runs the whole model on its own tokens (data parallel outside the
MoE layers; non-expert weights are replicated).  In each MoE layer the
experts are sharded over the ranks of a process group; each rank routes its
tokens with the model's own router, decides the drop levels *before*
dispatch, sends every token row once to each rank that holds at least one of
its surviving (sub-)experts, and gets back that rank's weighted partial sum.

Placement
    ``sub_experts=1`` (plain EP): expert e lives on rank ``e // (E / world)``
    (contiguous blocks, read in place from the model's weights).
    ``sub_experts=Q > 1`` (S-ETP, METHOD.md section 6): expert e is split along
    its neurons into Q sub-experts, sub-expert q being neurons
    ``[q*I/Q, (q+1)*I/Q)``, placed on rank ``(e*Q + q) % world``; a pair at
    level l of the policy's P partitions runs the sub-experts
    ``q < l*Q/P``.  The same all-to-all then does the work of
    expert-tensor parallelism.  Each rank copies its sub-experts' slices
    once, at patch time (:meth:`ExpertParallelRuntime.refresh_shards` after
    changing the weights in place, e.g. ``ds.reconstruct``).

Per layer and forward the exchange is: (LoadAware only) one ``all_gather``
of every rank's per-destination load; one ``all_gather`` of the per-destination
row counts and loads before/after dropping; one ``all_to_all_single`` of the
token rows (x, combine weights, local expert ids, levels packed as bytes);
one ``all_to_all_single`` of the partial outputs back.  gloo supports
``all_to_all_single`` with uneven split sizes in torch 2.x (checked by the
tests), so no padding is needed.  Every collective is waited on with the
timeout given to :class:`ExpertParallel`; a failure or timeout becomes an
:class:`ExpertParallelError` naming the layer and what was being exchanged.
"""
from __future__ import annotations

import datetime
import hashlib
import pickle
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import torch

from .. import ops
from .._version import __version__
from ..policies import DynamicSkip, LoadAware, Policy, Thresholds
from . import torch_experts

_ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layers failed or timed out, or the
    ranks were patched inconsistently.  After a failed collective the process
    group should be considered unusable."""


@dataclass(frozen=True)
class ExpertParallel:
    """Options of ``ds.patch(model, policy, expert_parallel=...)``.

    ``group``: a ``torch.distributed`` process group (None: the default
    group); ``sub_experts``: Q sub-experts per expert placed on different
    ranks (1: plain EP; Q > 1: S-ETP); ``timeout``: seconds any collective
    may take before it is an error."""

    group: Any = None
    sub_experts: int = 1
    timeout: float = 60.0

    def __post_init__(self):
        q = self.sub_experts
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
            raise ValueError(f"ExpertParallel: sub_experts must be a positive int; got {q!r}")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0) or t == float("inf"):
            raise ValueError(f"ExpertParallel: timeout must be a positive finite number of seconds; got {t!r}")


def as_options(expert_parallel) -> Optional[ExpertParallel]:
    """The :class:`ExpertParallel` meant by ``patch(expert_parallel=...)``."""
    if expert_parallel is None or expert_parallel is False:
        return None
    if expert_parallel is True:
        return ExpertParallel()
    if isinstance(expert_parallel, ExpertParallel):
        return expert_parallel
    import torch.distributed as dist

    if isinstance(expert_parallel, dist.ProcessGroup):
        return ExpertParallel(group=expert_parallel)
    raise TypeError("dualsparse.patch: expert_parallel must be True (the default process group), a "
                    "torch.distributed ProcessGroup or a dualsparse.ExpertParallel; got "
                    f"{type(expert_parallel).__name__}")


# ------------------------------------------------------------------ statistics

class _LayerLoads:
    """Per-layer accumulators (identical on every rank: built from gathered data)."""

    def __init__(self, world: int):
        self.forwards = 0
        self.before = np.zeros(world)       # expert units routed to each rank before dropping
        self.after = np.zeros(world)        # ... computed after dropping
        self.max_before = 0.0               # sum over forwards of the most loaded rank's load
        self.max_after = 0.0
        self.scale = np.zeros(world)        # sum over forwards of each rank's threshold factor

    def add(self, before, after, scale):
        self.forwards += 1
        self.before += before
        self.after += after
        self.max_before += float(before.max())
        self.max_after += float(after.max())
        self.scale += scale


@dataclass
class ExpertParallelStats:
    """Loads per rank and MoE layer, in expert-computation units (a pair
    computing a fraction f of an expert counts f on each rank holding a part
    of it, in proportion), summed over forwards since the last reset; the
    same on every rank.

    ``load_before[l][d]`` / ``load_after[l][d]``: rank d's load in layer l
    before / after dropping; ``max_load_before[l]`` / ``max_load_after[l]``:
    sum over forwards of the most loaded rank's load (what sets the MoE
    time); ``max_load_ratio_*``: that over the sum of the mean loads (1 is
    perfect balance); ``threshold_scale[l][d]``: rank d's mean threshold
    factor (1 unless LoadAware lowered it)."""

    names: List[str]
    world_size: int
    forwards: List[int]
    load_before: np.ndarray     # (L, world)
    load_after: np.ndarray      # (L, world)
    max_load_before: np.ndarray  # (L,)
    max_load_after: np.ndarray   # (L,)
    threshold_scale: np.ndarray  # (L, world)

    @staticmethod
    def _ratio(mx, loads):
        mean = loads.sum(-1) / loads.shape[-1]
        return np.divide(mx, mean, out=np.ones_like(mx), where=mean > 0)

    @property
    def max_load_ratio_before(self) -> np.ndarray:
        return self._ratio(self.max_load_before, self.load_before)

    @property
    def max_load_ratio_after(self) -> np.ndarray:
        return self._ratio(self.max_load_after, self.load_after)

    @property
    def total_max_load_after(self) -> float:
        """Sum over layers of the most loaded rank's load after dropping."""
        return float(self.max_load_after.sum())

    @property
    def drop_rate(self) -> float:
        """Dropped routed work / routed work, over all ranks and layers."""
        full = float(self.load_before.sum())
        return 0.0 if full == 0 else 1.0 - float(self.load_after.sum()) / full

    def __repr__(self):
        return (f"ExpertParallelStats(world={self.world_size}, drop_rate={self.drop_rate:.4f}, max_load_ratio_after="
                f"[{', '.join(f'{r:.3f}' for r in self.max_load_ratio_after)}])")


# ------------------------------------------------------------------ runtime

def _policy_signature(policy: Policy) -> str:
    h = hashlib.sha256(type(policy).__name__.encode())
    base = policy.base if isinstance(policy, LoadAware) else policy
    h.update(repr(policy).encode())
    if isinstance(base, Thresholds):
        h.update(base.table.tobytes())
        h.update(bytes([base.normalize]))
    if isinstance(base, DynamicSkip) and base.betas is not None:
        h.update(np.ascontiguousarray(base.betas).tobytes())
    for attr in ("rate", "seed", "k"):
        if hasattr(base, attr):
            h.update(repr(getattr(base, attr)).encode())
    return f"{policy.describe()} [{h.hexdigest()[:16]}]"


class ExpertParallelRuntime:
    """The expert-parallel state of one patched model on one rank."""

    def __init__(self, handle, opts: ExpertParallel):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("dualsparse.patch: expert_parallel needs an initialised torch.distributed process "
                               "group (launch with torchrun and call torch.distributed.init_process_group first)")
        self.dist = dist
        self.handle = handle
        self.group = opts.group
        self.opts = opts
        self.timeout = datetime.timedelta(seconds=float(opts.timeout))
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        self.Q = int(opts.sub_experts)
        self.trace: Optional[list] = None   # a list: every layer call appends its routing and levels (tests, debugging)
        #: CPU seconds (this process) spent computing this rank's experts, all layers: unlike wall time it
        #: does not count waiting for other ranks, so it tracks the rank's load even on oversubscribed cores
        self.expert_cpu_seconds = 0.0
        self.cpu_log: Optional[list] = None  # a list: every layer call appends its expert CPU seconds (benchmarks)
        layers = handle.layers
        if handle.family.gpt_oss:
            raise NotImplementedError("dualsparse.patch: expert_parallel does not support GPT-OSS experts (biased, "
                                      "interleaved; they run in the torch path)")
        E = layers[0].num_experts
        if self.Q == 1 and E % self.world:
            raise ValueError(f"dualsparse.patch: expert_parallel: {E} experts cannot be split evenly over "
                             f"{self.world} ranks (number of experts not divisible by the world size)")
        if self.Q > 1:
            if (E * self.Q) % self.world:
                raise ValueError(f"dualsparse.patch: expert_parallel: {E} experts x {self.Q} sub-experts cannot be "
                                 f"split evenly over {self.world} ranks")
            for l in layers:
                if l.intermediate % self.Q:
                    raise ValueError(f"dualsparse.patch: expert_parallel: sub_experts={self.Q} does not divide the "
                                     f"intermediate size {l.intermediate} of {l.name}")
        self.num_experts = E
        Q, W = self.Q, self.world
        if Q == 1:
            per = E // W
            self.place = np.repeat(np.arange(W), per)[:, None]           # (E, 1)
            self.local_id = (np.arange(E) % per)[:, None]
        else:
            flat = np.arange(E * Q)
            self.place = (flat % W).reshape(E, Q)
            self.local_id = (flat // W).reshape(E, Q)                      # order e*Q+q among the rank's shards
        self.num_local = (E * Q) // W                                          # (sub-)experts per rank
        self._place_t = {}
        self.shards = {}        # layer ordinal -> (gate_up, down) local slices (S-ETP)
        self.loads = [_LayerLoads(W) for _ in layers]
        self.check_policy(handle.policy)
        self.handshake(handle.policy)
        if Q > 1:
            self.refresh_shards()

    # -- checks
    def check_policy(self, policy: Policy):
        if isinstance(policy, LoadAware) and policy.rule == "fill" and self.Q > 1:
            raise ValueError("dualsparse: LoadAware(rule='fill') needs plain expert parallelism (sub_experts=1); "
                             f"this model is patched with sub_experts={self.Q}")
        P = policy.num_partitions
        if self.Q > 1 and self.Q % P:
            raise ValueError(f"dualsparse: expert_parallel with sub_experts={self.Q} needs a policy whose number of "
                             f"partitions divides it; {policy.describe()} has {P}")

    def _signature(self, policy):
        h = self.handle
        l0 = h.layers[0]
        w = l0.fused_weights()[0] if not h.family.gpt_oss else l0.experts.gate_up_proj
        return {
            "dualsparse": __version__,
            "world size": self.world,
            "model": f"{type(h.model).__name__} ({h.family.model_type})",
            "MoE layers": [l.name for l in h.layers],
            "experts, top-k, hidden, intermediate": [(l.num_experts, l.top_k, l.hidden, l.intermediate)
                                                     for l in h.layers],
            "expert dtype": str(w.dtype),
            "sub_experts": self.Q,
            "policy": _policy_signature(policy),
        }

    def handshake(self, policy, what="patch"):
        """Checks with one all_gather that every rank has the same model shape,
        options and policy; raises the same error on every rank otherwise."""
        mine = self._signature(policy)
        blob = pickle.dumps(mine)
        dev = self._comm_device(None)
        n = torch.tensor([len(blob)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        self._wait(self.dist.all_gather(sizes, n, group=self.group, async_op=True),
                   f"{what} handshake (all_gather of configuration sizes)", None)
        m = max(int(s.item()) for s in sizes)
        buf = torch.zeros(m, dtype=torch.uint8, device=dev)
        buf[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)
        bufs = [torch.zeros_like(buf) for _ in range(self.world)]
        self._wait(self.dist.all_gather(bufs, buf, group=self.group, async_op=True),
                   f"{what} handshake (all_gather of configurations)", None)
        sigs = [pickle.loads(b[:int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]
        problems = []
        for r, sig in enumerate(sigs[1:], start=1):
            for key, v0 in sigs[0].items():
                if sig.get(key) != v0:
                    problems.append(f"rank {r} has {key} {sig.get(key)!r} but rank 0 has {v0!r}")
        if problems:
            raise ExpertParallelError(f"dualsparse expert parallel ({what}): the ranks are not patched alike: "
                                      + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))

    # -- S-ETP weight slices
    def refresh_shards(self):
        """(Re)copies this rank's sub-expert slices from the model's weights
        (S-ETP only): call after changing expert weights in place."""
        if self.Q == 1:
            return
        Q = self.Q
        mine = [(e, q) for e in range(self.num_experts) for q in range(Q) if self.place[e, q] == self.rank]
        for l in self.handle.layers:
            gu, dn = l.fused_weights()
            I = l.intermediate
            n = I // Q
            with torch.no_grad():
                g = torch.stack([torch.cat([gu[e, q * n:(q + 1) * n], gu[e, I + q * n:I + (q + 1) * n]])
                                 for e, q in mine]).contiguous()
                d = torch.stack([dn[e, :, q * n:(q + 1) * n] for e, q in mine]).contiguous()
            self.shards[l.ordinal] = (g, d)

    def _local_weights(self, layer):
        if self.Q > 1:
            return self.shards[layer.ordinal]
        gu, dn = layer.fused_weights()
        per = self.num_experts // self.world
        return gu[self.rank * per:(self.rank + 1) * per], dn[self.rank * per:(self.rank + 1) * per]

    # -- collectives
    def _comm_device(self, x):
        if self.backend == "nccl":
            return x.device if x is not None else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _wait(self, work, what, layer):
        where = "" if layer is None else f" in MoE layer {layer.ordinal} ({layer.name})"
        try:
            if work is not None and work.wait(timeout=self.timeout) is False:
                raise RuntimeError("the collective did not complete")
        except ExpertParallelError:
            raise
        except Exception as exc:  # noqa: BLE001  (gloo/NCCL raise RuntimeError and its subclasses)
            raise ExpertParallelError(
                f"dualsparse expert parallel: rank {self.rank} of {self.world}: {what}{where} failed or timed out "
                f"after at most {self.timeout.total_seconds():g} s (another rank failed, exited, or runs a different "
                f"number of MoE layer calls?): {exc}") from exc

    def _all_gather(self, t, what, layer):
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self.dist.all_gather(out, t, group=self.group, async_op=True), what, layer)
        return torch.stack(out).cpu()

    def _all_reduce(self, t, what, layer):
        t = t.clone()
        self._wait(self.dist.all_reduce(t, group=self.group, async_op=True), what, layer)
        return t.cpu()

    def _all_to_all(self, send, send_counts, recv_counts, what, layer):
        recv = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
        self._wait(self.dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group,
                                               async_op=True), what, layer)
        return recv

    # -- the layer computation
    def run(self, layer, x, ids, w):
        h = self.handle
        policy = h.policy
        if layer.importance is not None:
            raise NotImplementedError("dualsparse.profile under expert_parallel: profile the model in one process, "
                                      "then patch with expert_parallel")
        if h.recorder is not None:
            h.recorder.record(layer.ordinal, w, h.token_mask)
        T, K = ids.shape
        W, Q = self.world, self.Q
        P = policy.num_partitions
        G = Q if Q > 1 else P                       # fine units per expert: levels are counted in 1/G
        dev = x.device
        ids64 = ids.to(torch.int64)
        place = self._place(dev)                    # (E, Q)
        unit_q = torch.arange(G, device=dev) * Q // G
        unit_rank = place[ids64][:, :, unit_q]      # (T, K, G): rank computing each fine unit of each pair
        cdev = self._comm_device(x)

        scale = np.ones(W)
        if isinstance(policy, LoadAware):
            thr = policy.thresholds(layer.ordinal)
            if policy.rule == "ratio":
                before_to = torch.bincount(unit_rank.reshape(-1), minlength=W).to(torch.float64) / G
                gathered = self._all_gather(before_to.to(cdev), "all_gather of per-rank loads before dropping",
                                            layer)
                scale = LoadAware.scale(gathered.sum(0).numpy())
            else:
                hist = fill_histogram(w, unit_rank, thr, P, policy.steps, W, policy.normalize)
                hist = self._all_reduce(hist.to(cdev), "all_reduce of per-rank score histograms", layer)
                scale = fill_scale(hist.numpy(), policy.steps)
            levels = load_aware_levels(w, unit_rank, thr, torch.as_tensor(scale), P, policy.normalize)
        else:
            lv, new_w = policy.route(w, ids, layer.ordinal, h.generator)
            if new_w is not None:
                w = new_w
            if lv is None:
                levels = torch.full((T, K), G, dtype=torch.int32, device=dev)
            else:
                levels = lv.to(torch.int32) * (G // P)
        layer._count(ids, levels, G, h.token_mask)

        active = torch.arange(G, device=dev)[None, None, :] < levels[:, :, None]     # (T, K, G)
        before_to = torch.bincount(unit_rank.reshape(-1), minlength=W).to(torch.float64) / G
        after_to = torch.bincount(unit_rank[active], minlength=W).to(torch.float64) / G

        # slots: one per (k, sub-expert q); shard level in the engine's partitions
        if Q == 1:
            s_rank = unit_rank[:, :, 0]                                   # (T, K)
            s_level = levels
            s_lid = torch.as_tensor(self.local_id[:, 0], device=dev)[ids64]
            s_w = w
            P_eng = P
        else:
            q = torch.arange(Q, device=dev)
            s_rank = place[ids64].reshape(T, K * Q)
            s_level = (q[None, None, :] < levels[:, :, None]).to(torch.int32).reshape(T, K * Q)
            s_lid = torch.as_tensor(self.local_id, device=dev)[ids64].reshape(T, K * Q)
            s_w = w[:, :, None].expand(T, K, Q).reshape(T, K * Q)
            P_eng = 1
        live = s_level > 0
        # one row per (token, destination rank) with at least one live slot there, grouped by destination
        rows_t, rows_mask, send_counts = [], [], []
        for d in range(W):
            on_d = live & (s_rank == d)
            t_idx = torch.nonzero(on_d.any(1)).reshape(-1)
            rows_t.append(t_idx)
            rows_mask.append(on_d[t_idx])
            send_counts.append(int(t_idx.numel()))
        row_tokens = torch.cat(rows_t)
        mask = torch.cat(rows_mask)
        x_s = x[row_tokens]
        w_s = torch.where(mask, s_w[row_tokens].float(), torch.zeros((), device=dev))
        lid_s = torch.where(mask, s_lid[row_tokens], torch.zeros((), dtype=torch.int64, device=dev)).to(torch.int32)
        lv_s = torch.where(mask, s_level[row_tokens], torch.zeros((), dtype=torch.int32, device=dev)).to(torch.int8)
        # a row has at most one live slot per local (sub-)expert of its destination (a token's experts are
        # distinct): live slots first, then keep that many columns (the engine needs K <= local experts)
        S = min(s_level.shape[1], self.num_local)
        if S < s_level.shape[1]:
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :S]
            w_s, lid_s, lv_s = (torch.gather(t, 1, order) for t in (w_s, lid_s, lv_s))

        info = torch.stack([torch.tensor(send_counts, dtype=torch.float64), before_to.cpu(), after_to.cpu()], 1)
        gathered = self._all_gather(info.to(cdev), "all_gather of row counts and loads", layer)   # (src, dst, 3)
        recv_counts = [int(v) for v in gathered[:, self.rank, 0].tolist()]
        load_before = gathered[:, :, 1].sum(0).numpy()
        load_after = gathered[:, :, 2].sum(0).numpy()
        self.loads[layer.ordinal].add(load_before, load_after, scale)
        if self.trace is not None:
            self.trace.append(dict(layer=layer.ordinal, ids=ids.cpu().clone(), weights=w.float().cpu().clone(),
                                   levels=levels.cpu().clone(), units=G, load_before=load_before,
                                   load_after=load_after, scale=scale))

        packed = _pack([x_s, w_s, lid_s, lv_s]).to(cdev)
        recv = self._all_to_all(packed, send_counts, recv_counts, "all_to_all of dispatched token rows", layer)
        x_r, w_r, lid_r, lv_r = _unpack(recv.to(dev), [(x.dtype, x.shape[1]), (torch.float32, S), (torch.int32, S),
                                                       (torch.int8, S)])
        gu, dn = self._local_weights(layer)
        c0 = time.process_time()
        if dev.type == "cpu" and x.dtype in _ENGINE_DTYPES and gu.dtype == x.dtype:
            y_r = ops.moe_experts(x_r, lid_r, w_r, gu, dn, levels=lv_r, num_partitions=P_eng,
                                  num_threads=h.num_threads)
        else:
            y_r = torch_experts.swiglu_experts(x_r, lid_r.to(torch.int64), w_r, gu, dn, lv_r, P_eng,
                                               act=layer._act())
        dt = time.process_time() - c0
        self.expert_cpu_seconds += dt
        if self.cpu_log is not None:
            self.cpu_log.append(dt)
        y_s = self._all_to_all(y_r.to(cdev).contiguous(), recv_counts, send_counts,
                               "all_to_all of expert outputs back to their tokens", layer).to(dev)
        out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=dev)
        out.index_add_(0, row_tokens, y_s.float())
        return out.to(x.dtype)

    def _place(self, dev):
        t = self._place_t.get(dev)
        if t is None:
            t = self._place_t[dev] = torch.as_tensor(self.place, dtype=torch.int64, device=dev)
        return t

    # -- statistics
    def stats(self) -> ExpertParallelStats:
        L = self.loads
        return ExpertParallelStats(
            names=[l.name for l in self.handle.layers], world_size=self.world, forwards=[a.forwards for a in L],
            load_before=np.stack([a.before for a in L]), load_after=np.stack([a.after for a in L]),
            max_load_before=np.array([a.max_before for a in L]), max_load_after=np.array([a.max_after for a in L]),
            threshold_scale=np.stack([a.scale / max(a.forwards, 1) for a in L]))

    def reset(self):
        self.loads = [_LayerLoads(self.world) for _ in self.handle.layers]
        self.expert_cpu_seconds = 0.0


def load_aware_levels(w, unit_rank, thresholds, scale, P: int, normalize: bool = True):
    """Levels (T, K) int32 in fine units of ``G = unit_rank.shape[2]``:
    unit u of a pair belongs to policy partition ``j = u*P // G`` and runs on
    rank ``unit_rank[t, k, u]``; it passes when
    ``s >= thresholds[j] * scale[rank]`` (s: the top-K-normalised score,
    float64, summed over k in order), and a pair computes the longest prefix
    of passing units."""
    s = _scores(w, normalize)
    G = unit_rank.shape[2]
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=w.device)
    unit_thr = thr[torch.arange(G, device=w.device) * P // G]                 # (G,)
    t = unit_thr[None, None, :] * scale.to(torch.float64).to(w.device)[unit_rank]
    ok = s[:, :, None] >= t
    return torch.cumprod(ok.to(torch.int32), dim=2).sum(2, dtype=torch.int32)


def _scores(w, normalize=True):
    s = w.to(torch.float64)
    if normalize:
        tot = s[:, 0].clone()
        for k in range(1, s.shape[1]):
            tot += s[:, k]
        s = s / tot[:, None]
    return s


def fill_histogram(w, unit_rank, thresholds, P: int, steps: int, world: int, normalize: bool = True):
    """(world, steps + 1) float64: ``hist[d, b]`` is the expert units on rank
    d that pass at factors ``c <= b / steps`` and not above (``s >= c * T_j``;
    plain EP, where a pair's units share one rank and the prefix rule is a
    count)."""
    s = _scores(w, normalize)
    G = unit_rank.shape[2]
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=w.device)[torch.arange(G, device=w.device) * P // G]
    sg = s[:, :, None].expand(-1, -1, G)
    tg = thr[None, None, :].expand_as(sg)
    grid = torch.arange(steps + 1, dtype=torch.float64, device=w.device) / steps
    # the largest b with s >= grid[b] * T (exactly the comparison load_aware_levels makes)
    ratio = torch.where(tg > 0, sg / tg.clamp_min(1e-300), torch.full_like(sg, float(steps)))
    b = torch.clamp(torch.floor(ratio * steps), 0, steps).to(torch.int64)
    up = torch.clamp(b + 1, max=steps)
    b = torch.where((up > b) & (sg >= grid[up] * tg), up, b)
    for _ in range(2):
        b = torch.where((b > 0) & ~(sg >= grid[b] * tg), b - 1, b)
    passes0 = sg >= grid[0] * tg          # False only for a negative score
    idx = unit_rank * (steps + 1) + b
    hist = torch.zeros(world * (steps + 1), dtype=torch.float64, device=w.device)
    hist.index_add_(0, idx[passes0], torch.full((int(passes0.sum()),), 1.0 / G, dtype=torch.float64,
                                                device=w.device))
    return hist.reshape(world, steps + 1)


def fill_scale(hist, steps: int) -> np.ndarray:
    """Per-rank factor of rule 'fill' from the summed histograms: the
    smallest ``b / steps`` whose load (units passing) stays at or below the
    largest load at factor 1."""
    load = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]       # load[d, b]: units passing at factor b / steps
    bar = load[:, steps].max()
    ok = load <= bar * (1 + 1e-12) + 1e-12
    first = ok.argmax(axis=1)                              # load is non-increasing in b: the first ok index
    return first / float(steps)


def _pack(parts):
    """Rows of several 2-D tensors (same row count) as one uint8 tensor."""
    return torch.cat([p.contiguous().view(torch.uint8).reshape(p.shape[0], p.shape[1] * p.element_size())
                      for p in parts], 1).contiguous()


def _unpack(buf, specs):
    out, off = [], 0
    for dtype, n in specs:
        nb = n * torch.empty((), dtype=dtype).element_size()
        # a fresh (R, nb) buffer: a column slice made contiguous may keep an odd row stride when R == 1,
        # which a view as a wider dtype rejects
        part = torch.empty((buf.shape[0], nb), dtype=torch.uint8, device=buf.device)
        part.copy_(buf[:, off:off + nb])
        out.append(part.view(dtype))
        off += nb
    return out


# ------------------------------------------------------------------ experiments

def add_router_bias(model, bias) -> list:
    """Adds ``bias`` (E numbers) to the router logits of every MoE layer of a
    softmax top-k family (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE; both
    transformers generations), through forward hooks: a tool for experiments
    with deliberately skewed routing (expert parallelism's load imbalance).
    Returns the hook handles (``h.remove()`` undoes it)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from .families import family_for
    from .patching import find_moe_blocks

    fam = family_for(model)
    if fam.model_type not in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        raise NotImplementedError(f"add_router_bias: {fam.model_type} routing is not a plain softmax top-k")
    bias = torch.as_tensor(bias, dtype=torch.float32)
    hooks = []
    for _, block in find_moe_blocks(model, fam):
        gate = block.gate
        if bias.shape != (gate.weight.shape[0],):
            raise ValueError(f"add_router_bias: bias must have one value per expert ({gate.weight.shape[0]}); "
                             f"got shape {tuple(bias.shape)}")
        if isinstance(gate, nn.Linear):           # transformers 4.x: the block routes from the logits
            hooks.append(gate.register_forward_hook(lambda m, a, out: out + bias.to(out.dtype)))
            continue
        renorm = bool(getattr(gate, "norm_topk_prob", True))   # Mixtral's router always renormalises

        def hook(m, args, out, renorm=renorm):
            logits = out[0] + bias.to(out[0].dtype)
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            top, idx = torch.topk(probs, m.top_k, dim=-1)
            if renorm:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(out[1].dtype), idx

        hooks.append(gate.register_forward_hook(hook))
    return hooks

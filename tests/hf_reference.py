"""Independent references for the Hugging Face integration tests.

Nothing here calls dualsparse: routing is read from the model's own router
modules through forward hooks (the router modules are never swapped by the
patch, so the hooks see exactly what the patched forward consumed), and the
drop levels, drop statistics, DynamicSkip betas, neuron importance and
expert outputs are recomputed in float64 NumPy / torch from those outputs
and from the model's parameters.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import transformers

TV5 = int(transformers.__version__.split(".")[0]) >= 5


# ------------------------------------------------------------------ structure

def moe_blocks(model):
    """(name, block) of every sparse MoE block, in layer order, found from
    the decoder layers (not with dualsparse's own search)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for attr in ("mlp", "block_sparse_moe"):
            blk = getattr(layer, attr, None)
            if blk is not None and hasattr(blk, "experts"):
                out.append((f"model.layers.{i}.{attr}", blk))
                break
    return out


def router_of(block):
    return block.gate if hasattr(block, "gate") else block.router


def expert_count(cfg) -> int:
    for attr in ("n_routed_experts", "num_local_experts", "num_experts"):
        v = getattr(cfg, attr, None)
        if v:
            return int(v)
    raise AssertionError("no expert count")


def routed_intermediate(cfg) -> int:
    if cfg.model_type in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        return int(cfg.moe_intermediate_size)
    return int(cfg.intermediate_size)


def shared_units(cfg) -> float:
    """Per-token cost of the always-run shared expert(s) in routed-expert
    units, from the config alone (the issue's definition: shared
    intermediate size / routed intermediate size)."""
    mt = cfg.model_type
    if mt == "qwen2_moe":
        return cfg.shared_expert_intermediate_size / cfg.moe_intermediate_size
    if mt in ("deepseek_v2", "deepseek_v3"):
        return float(cfg.n_shared_experts or 0)
    return 0.0


# ------------------------------------------------------------------ routing

def _topk_softmax_v4(logits, k, renorm):
    """transformers 4.57 Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE block code:
    softmax in float32, top-k, optional renormalisation, cast back to the
    hidden dtype (= the gate Linear's output dtype)."""
    w = F.softmax(logits, dim=1, dtype=torch.float)
    w, idx = torch.topk(w, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(logits.dtype), idx


def routing_from_router(cfg, output):
    """(weights (T, K), indices (T, K)) of the model's own combine weights
    from what its router module returned."""
    mt = cfg.model_type
    if TV5:
        _logits, w, idx = output
        return w, idx
    if mt in ("deepseek_v2", "deepseek_v3"):
        idx, w = output
        return w, idx
    if mt == "gpt_oss":
        dense, idx = output
        return dense.gather(1, idx), idx
    logits = output
    k = int(cfg.num_experts_per_tok)
    if mt == "mixtral":
        return _topk_softmax_v4(logits, k, True)
    if mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return _topk_softmax_v4(logits, k, bool(cfg.norm_topk_prob))
    if mt == "phimoe":
        from transformers.models.phimoe import modeling_phimoe

        w, idx = modeling_phimoe.sparsemixer(logits, jitter_eps=cfg.router_jitter_noise, training=False)
        return w, idx
    raise AssertionError(f"no routing reference for {mt}")


class Tap:
    """Forward hooks on every MoE block's router (and, optionally, on the
    block itself for its input and output).  ``calls[layer]`` lists, per
    forward call of that layer, a dict with ``w`` (T, K) float64 numpy,
    ``w_t`` the original tensor, ``idx`` (T, K) int64 numpy, and with
    ``blocks=True`` also ``x`` (T, H) and ``y`` (T, H) tensors."""

    def __init__(self, model, blocks: bool = False):
        self.model = model
        self.cfg = model.config
        self.blocks = moe_blocks(model)
        self.calls = [[] for _ in self.blocks]
        self._pending = [None for _ in self.blocks]
        self.handles = []
        for i, (_, blk) in enumerate(self.blocks):
            self.handles.append(router_of(blk).register_forward_hook(self._router_hook(i)))
            if blocks:
                self.handles.append(blk.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
                self.handles.append(blk.register_forward_hook(self._post_hook(i)))

    def _router_hook(self, i):
        def hook(mod, args, output):
            w, idx = routing_from_router(self.cfg, output)
            rec = {"w": w.detach().double().cpu().numpy(), "w_t": w.detach().clone(),
                   "idx": idx.detach().cpu().numpy().astype(np.int64)}
            if self._pending[i] is not None:   # block input captured first
                rec.update(self._pending[i])
                self._pending[i] = None
            self.calls[i].append(rec)
        return hook

    def _pre_hook(self, i):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._pending[i] = {"x": x.detach().reshape(-1, x.shape[-1]).clone()}
        return hook

    def _post_hook(self, i):
        def hook(mod, args, output):
            y = output[0] if isinstance(output, tuple) else output
            self.calls[i][-1]["y"] = y.detach().reshape(-1, y.shape[-1]).clone()
        return hook

    def clear(self):
        self.calls = [[] for _ in self.blocks]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- accessors
    def weights(self, layer: int) -> np.ndarray:
        return np.concatenate([c["w"] for c in self.calls[layer]], axis=0)

    def normalized(self, layer: int) -> np.ndarray:
        return normalized(self.weights(layer))


def normalized(w: np.ndarray) -> np.ndarray:
    """Top-K-normalised scores s = w / sum_k w in float64, the sum taken
    over k in order."""
    w = np.asarray(w, dtype=np.float64)
    tot = np.zeros(w.shape[0], dtype=np.float64)
    for k in range(w.shape[1]):
        tot = tot + w[:, k]
    return w / tot[:, None]


def threshold_levels(s: np.ndarray, thresholds) -> np.ndarray:
    """Number of thresholds each normalised score reaches (s >= t)."""
    lv = np.zeros(s.shape, dtype=np.int64)
    for t in thresholds:
        lv += (s >= t)
    return lv


def dynamic_skip_levels(w: np.ndarray, betas) -> np.ndarray:
    """Keep the top-scoring selected expert; keep the k-th (k >= 2, by
    descending weight, stable) when s_k >= beta_k * s_1."""
    w = np.asarray(w, dtype=np.float64)
    T, K = w.shape
    betas = np.broadcast_to(np.asarray(betas, dtype=np.float64).reshape(-1), (K - 1,))
    order = np.argsort(-w, axis=1, kind="stable")
    ws = np.take_along_axis(w, order, axis=1)
    keep_sorted = np.ones_like(ws, dtype=bool)
    keep_sorted[:, 1:] = ws[:, 1:] >= betas[None, :] * ws[:, :1]
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep.astype(np.int64)


def dynamic_skip_betas(w: np.ndarray) -> np.ndarray:
    """Median over tokens of s_k / s_1 for every rank k >= 2."""
    ws = -np.sort(-np.asarray(w, dtype=np.float64), axis=1)
    return np.median(ws[:, 1:] / ws[:, :1], axis=0)


def drop_rates(levels_per_layer, P, shared):
    """(overall, per_layer) drop rate: 1 - computed units / full units, a
    pair at level p of P computing p/P of an expert; every token also runs
    ``shared`` units of shared expert (in both the numerator and the
    denominator)."""
    done, full, per = 0.0, 0.0, []
    for lv in levels_per_layer:
        T, K = lv.shape
        c = lv.sum() / P + T * shared
        f = T * K + T * shared
        per.append(1.0 - c / f)
        done += c
        full += f
    return 1.0 - done / full, per


# ------------------------------------------------------------------ experts

@torch.no_grad()
def expert_weights(block, e: int):
    """(W_gate (I, H), W_up (I, H), W_down (H, I)) of routed expert e, in
    float64, for the SwiGLU families, read from the model's own layout."""
    ex = block.experts
    if isinstance(ex, torch.nn.ModuleList):
        m = ex[e]
        if hasattr(m, "w1"):
            g, u, d = m.w1.weight, m.w3.weight, m.w2.weight
        else:
            g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        return g.double(), u.double(), d.double()
    gu = ex.gate_up_proj[e].double()           # (2I, H): [gate; up]
    I = gu.shape[0] // 2
    return gu[:I], gu[I:], ex.down_proj[e].double()


@torch.no_grad()
def gate_activation(block, e: int, x: torch.Tensor):
    """(act (T, I), up (T, I)) in float64: SiLU(x W_gate^T) and x W_up^T for
    the SwiGLU families; GPT-OSS: its clamped gate a*sigmoid(alpha*a) and the
    clamped up + 1."""
    x = x.double()
    ex = block.experts
    if hasattr(ex, "gate_up_proj") and ex.gate_up_proj.dim() == 3 and hasattr(ex, "alpha"):   # GPT-OSS
        gu = x @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        a, b = gu[:, ::2], gu[:, 1::2]
        a = a.clamp(max=ex.limit)
        b = b.clamp(min=-ex.limit, max=ex.limit)
        return a * torch.sigmoid(a * ex.alpha), b + 1
    g, u, _ = expert_weights(block, e)
    return F.silu(x @ g.t()), x @ u.t()


@torch.no_grad()
def routed_output(block, x, idx, w, levels=None, P: int = 1):
    """float64 sum_k w_k * f_e^(level)(x) over the routed experts, where a
    pair at level p computes the first (p*I)//P neurons of its expert (in
    the current neuron order) and a dropped pair contributes nothing.
    GPT-OSS: a computed pair always adds its down bias."""
    x = x.double()
    w = torch.as_tensor(np.asarray(w, dtype=np.float64))
    idx = torch.as_tensor(np.asarray(idx))
    T, K = idx.shape
    out = torch.zeros(x.shape, dtype=torch.float64)
    ex = block.experts
    gpt = hasattr(ex, "alpha")
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            lv = P if levels is None else int(levels[t, k])
            if lv == 0:
                continue
            act, up = gate_activation(block, e, x[t:t + 1])
            h = act * up
            I = h.shape[1]
            n = (lv * I) // P
            h[:, n:] = 0
            if gpt:
                y = h @ ex.down_proj[e].double() + ex.down_proj_bias[e].double()
            else:
                _, _, d = expert_weights(block, e)
                y = h @ d.t()
            out[t] += w[t, k] * y[0]
    return out


@torch.no_grad()
def shared_output(block, x):
    """The block's always-run shared expert output (0 when it has none),
    computed by the block's own shared modules."""
    if hasattr(block, "shared_expert"):
        return (torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)).double()
    if hasattr(block, "shared_experts"):
        return block.shared_experts(x).double()
    return torch.zeros(x.shape, dtype=torch.float64)


@torch.no_grad()
def importance_reference(block, x, idx, num_experts, weights=None):
    """Neuron importance of every expert over the pairs routed to it:
    {metric: (E, I) float64} for gate (sum act), abs_gate (sum |act|),
    gate_up (sum act*up), abs_gate_up (sum |act*up|), and counts (E,) (the
    number of pairs); with ``weights`` (T, K) every pair's terms and count
    are scaled by its routing weight."""
    idx = np.asarray(idx)
    sums, counts = {}, np.zeros(num_experts)
    for e in range(num_experts):
        rows, ks = np.nonzero(idx == e)
        c = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)[rows, ks]
        c_t = torch.as_tensor(c)[:, None]
        act, up = gate_activation(block, e, x[torch.as_tensor(rows, dtype=torch.long)])
        vals = {"gate": act, "abs_gate": act.abs(), "gate_up": act * up, "abs_gate_up": (act * up).abs()}
        for name, v in vals.items():
            sums.setdefault(name, np.zeros((num_experts, v.shape[1])))[e] = (c_t * v).sum(0).numpy()
        counts[e] = c.sum()
    return sums, counts


class RouterRecord:
    """Per MoE layer: the router's input (float64) and the experts it
    selected, for one forward call (hooks on the model's own routers)."""

    def __init__(self, model):
        self.cfg = model.config
        self.blocks = moe_blocks(model)
        self.x, self.idx = {}, {}
        self.handles = [router_of(b).register_forward_hook(self._hook(i)) for i, (_, b) in enumerate(self.blocks)]

    def _hook(self, i):
        def hook(mod, args, output):
            x = args[0]
            self.x[i] = x.detach().reshape(-1, x.shape[-1]).double()
            self.idx[i] = routing_from_router(self.cfg, output)[1].detach().clone()
        return hook

    def logits64(self, i):
        """The layer's router logits recomputed in float64 from its input."""
        r = router_of(self.blocks[i][1])
        out = self.x[i] @ r.weight.detach().double().t()
        b = getattr(r, "bias", None)
        return out if b is None else out + b.detach().double()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def partition_divergence(orig: RouterRecord, new: RouterRecord, P: int, K: int, shape, tol_eps: float):
    """Where the partitioned model's selection, mapped back to experts, is
    not every originally selected expert P times, in a (batch, seq) forward
    of both models on the same input.  Returns the positions kept (a bool
    (batch, seq) mask: those before the first divergence of their sequence
    in any layer).  Asserts that each divergence at a position whose layer
    input both models computed alike (no divergence at or before it in an
    earlier layer) is a tie at the original router's top-K boundary: every
    expert selected by one model and not the other has a logit within
    ``tol_eps * max |logit|`` of the lowest selected one.  P = 1 compares
    two models with the same experts (e.g. unpatched and patched)."""
    B, S = shape
    first = [S] * B          # first diverged position of each sequence, over the layers seen so far
    for i in sorted(orig.idx):
        io, inn = orig.idx[i], new.idx[i]
        lg = orig.logits64(i)
        now = list(first)
        for t in range(io.shape[0]):
            b, pos = divmod(t, S)
            so = sorted(io[t].tolist())
            sn = sorted((inn[t] // P).tolist())
            if sn == sorted(so * P):
                continue
            now[b] = min(now[b], pos)
            if pos >= first[b]:
                continue     # this layer's input already differs here: a consequence, not a cause
            full = {e for e in set(sn) if sn.count(e) == P}
            differ = (set(so) ^ full) | {e for e in set(sn) if sn.count(e) != P}
            boundary = float(lg[t, so].min())
            tol = tol_eps * float(lg[t].abs().max())
            gaps = {e: abs(float(lg[t, e]) - boundary) for e in differ}
            assert max(gaps.values()) <= tol, (f"layer {i} token {t}: selection {so} became {sn} without a tie at "
                                               f"the top-{K} boundary (logit gaps {gaps}, tolerance {tol})")
        first = now
    keep = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        keep[b, first[b]:] = False
    return keep

"""MoEfication: a dense Llama-architecture model turned into a standard
Qwen2-MoE checkpoint by splitting every SwiGLU FFN along its neurons.

Each FFN's ``I`` neurons are divided into a shared expert (the ``S`` neurons
with the largest mean contribution, run for every token) and ``E`` routed
experts of ``(I - S) / E`` neurons each (balanced k-means of the neurons'
co-activation on calibration text).  A linear router per layer, trained on
the dense model's FFN inputs to rank the experts by the norm of their output,
picks ``top_k`` routed experts per token.  Nothing else changes: attention,
norms and embeddings are copied.

The split itself is exact: with every expert selected and equal combine
weights, the MoE's FFN output equals the dense one up to summation order.
In the checkpoint:

* the shared expert gate is zero (sigmoid 0.5) and the shared down projection
  is doubled, so the shared expert enters with weight exactly 1;
* routing is Qwen2-MoE's softmax, top-k, renormalised (``norm_topk_prob``);
  each routed down projection is multiplied by ``top_k``, so equal logits give
  every selected expert weight exactly 1 (``top_k`` a power of two).  The
  router logits are ``temperature * R x``: a small temperature keeps the
  combine weights near 1 (what the dense FFN does) while their order, which
  DualSparse's drop decisions read, is the router's.

``build_plan`` computes the split and trains the routers (plain torch);
``moe_state_dict`` and ``moe_config`` write the checkpoint from a plan.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Optional

import numpy as np

PLAN_FORMAT = 1


@dataclasses.dataclass
class MoEPlan:
    """Where each neuron goes, and the routers.  ``shared[l]``: sorted neuron
    indices of layer ``l``'s shared expert; ``experts[l]``: ``[E, m]`` neuron
    indices of each routed expert (ascending within an expert); ``routers[l]``:
    ``[E, H]`` router weights before ``temperature``."""
    shared: List[np.ndarray]
    experts: List[np.ndarray]
    routers: List[np.ndarray]
    top_k: int
    temperature: float = 1.0
    info: Dict = dataclasses.field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def num_experts(self) -> int:
        return int(self.experts[0].shape[0])

    @property
    def expert_size(self) -> int:
        return int(self.experts[0].shape[1])

    @property
    def shared_size(self) -> int:
        return int(self.shared[0].shape[0])

    def validate(self, intermediate: Optional[int] = None, hidden: Optional[int] = None) -> None:
        """Raises ValueError unless every layer's shared and routed neurons
        are disjoint and together cover 0..I-1 exactly once."""
        if not self.experts:
            raise ValueError("MoEPlan: no layers")
        if not (len(self.shared) == len(self.experts) == len(self.routers)):
            raise ValueError(f"MoEPlan: {len(self.shared)} shared sets, {len(self.experts)} expert tables and "
                             f"{len(self.routers)} routers; they must be one per layer")
        E, m, S = self.num_experts, self.expert_size, self.shared_size
        if S < 1:
            raise ValueError("MoEPlan: the shared expert must have at least one neuron (Qwen2-MoE layout)")
        if not (1 <= self.top_k <= E):
            raise ValueError(f"MoEPlan: top_k must be in [1, {E}]; got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"MoEPlan: temperature must be finite and > 0; got {self.temperature}")
        I = S + E * m
        if intermediate is not None and I != intermediate:
            raise ValueError(f"MoEPlan: {S} shared + {E} x {m} routed neurons = {I}, but the model's FFNs have "
                             f"{intermediate}")
        for l, (sh, ex, r) in enumerate(zip(self.shared, self.experts, self.routers)):
            if sh.shape != (S,) or ex.shape != (E, m):
                raise ValueError(f"MoEPlan: layer {l} has shapes {sh.shape} / {ex.shape}; expected ({S},) / ({E}, {m})")
            allidx = np.concatenate([sh, ex.reshape(-1)])
            if not np.array_equal(np.sort(allidx), np.arange(I)):
                raise ValueError(f"MoEPlan: layer {l}'s neurons are not a partition of 0..{I - 1}")
            if r.ndim != 2 or r.shape[0] != E or (hidden is not None and r.shape[1] != hidden):
                raise ValueError(f"MoEPlan: layer {l}'s router has shape {r.shape}; expected ({E}, "
                                 f"{hidden if hidden is not None else 'H'})")
            if not np.isfinite(r).all():
                raise ValueError(f"MoEPlan: layer {l}'s router has non-finite weights")

    # ------------------------------------------------------------ storage
    def save(self, path) -> None:
        """One compressed ``.npz`` (neuron indices as int16, routers as
        float32) with the settings and ``info`` as JSON."""
        arrays = {}
        for l in range(self.num_layers):
            arrays[f"shared_{l}"] = self.shared[l].astype(np.int16)
            arrays[f"experts_{l}"] = self.experts[l].astype(np.int16)
            arrays[f"router_{l}"] = self.routers[l].astype(np.float32)
        meta = {"format": PLAN_FORMAT, "num_layers": self.num_layers, "top_k": int(self.top_k),
                "temperature": float(self.temperature), "info": self.info}
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path) -> "MoEPlan":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != PLAN_FORMAT:
                raise ValueError(f"MoEPlan.load: {path}: format {meta.get('format')!r}, expected {PLAN_FORMAT}")
            n = int(meta["num_layers"])
            plan = cls(shared=[z[f"shared_{l}"].astype(np.int64) for l in range(n)],
                       experts=[z[f"experts_{l}"].astype(np.int64) for l in range(n)],
                       routers=[z[f"router_{l}"].astype(np.float32) for l in range(n)],
                       top_k=int(meta["top_k"]), temperature=float(meta["temperature"]), info=meta.get("info", {}))
        plan.validate()
        return plan


# ------------------------------------------------------------------ the dense model

def _dense_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"moefication: {type(model).__name__} has no model.layers")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"moefication: layer {i} has no SwiGLU mlp (gate_proj, up_proj, down_proj)")
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"moefication: hidden_act {cfg.hidden_act!r}; only SiLU-gated FFNs are supported")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ValueError("moefication: models with biases in the FFN or attention are not supported")
    return layers


def ffn_inputs(model, batches, show_progress: bool = True) -> List:
    """The inputs of every layer's FFN (after the post-attention norm) on the
    token batches, one float32 ``[N, H]`` tensor per layer."""
    import torch

    layers = _dense_layers(model)
    store: List[list] = [[] for _ in layers]

    def hook(i):
        def pre(mod, args):
            store[i].append(args[0].reshape(-1, args[0].shape[-1]).detach().float().clone())
        return pre

    hooks = [l.mlp.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    it = batches
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="FFN inputs", leave=False)
    try:
        with torch.no_grad():
            for b in it:
                model.model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


def _acts(x, wg, wu):
    import torch.nn.functional as F

    return F.silu(x @ wg.T) * (x @ wu.T)


def balanced_kmeans(feat, k: int, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Equal-size clusters of the rows of ``feat`` (unit norm) by cosine
    similarity: each round, rows in order of their best similarity take the
    most similar centroid that still has room.  Returns the cluster of each
    row."""
    import torch

    n = feat.shape[0]
    if n % k:
        raise ValueError(f"balanced_kmeans: {n} rows do not split into {k} equal clusters")
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    cent = feat[torch.randperm(n, generator=g)[:k]].clone()
    assign = None
    for _ in range(iters):
        sim = (feat @ cent.T).double().numpy()
        new = np.full(n, -1, dtype=np.int64)
        fill = np.zeros(k, dtype=np.int64)
        for i in np.argsort(-sim.max(1), kind="stable"):
            e = int(np.argmax(np.where(fill < cap, sim[i], -np.inf)))
            new[i] = e
            fill[e] += 1
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for e in range(k):
            c = feat[torch.from_numpy(assign == e)].sum(0)
            cent[e] = c / c.norm().clamp_min(1e-12)
    return assign


def plan_layer(x, wg, wu, wd, num_experts: int, shared: int, *, feature_tokens: int = 4096, router_steps: int = 300,
               lr: float = 0.01, seed: int = 0):
    """(shared indices, [E, m] expert indices, [E, H] router, final router
    loss) for one FFN, from its inputs ``x`` ``[N, H]`` (float32)."""
    import torch

    I = wg.shape[0]
    if (I - shared) % num_experts or shared < 1 or shared >= I:
        raise ValueError(f"moefication: {I} neurons minus {shared} shared do not split into {num_experts} experts")
    with torch.no_grad():
        h = _acts(x, wg, wu)
        mean_contrib = h.abs().mean(0) * wd.norm(dim=0)
        order = torch.argsort(mean_contrib, descending=True, stable=True)
        sh = order[:shared].sort().values
        routed = order[shared:].sort().values
        f = h[:feature_tokens, routed].abs().T
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        assign = torch.from_numpy(balanced_kmeans(f, num_experts, seed=seed))
        groups = [routed[assign == e] for e in range(num_experts)]
        contrib = torch.stack([(h[:, g] @ wd[:, g].T).norm(dim=1) for g in groups], 1)
        target = contrib ** 2
        target = target / target.sum(1, keepdim=True).clamp_min(1e-30)
    torch.manual_seed(seed)
    r = torch.zeros(num_experts, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr)
    loss = None
    for _ in range(router_steps):
        opt.zero_grad()
        loss = -(target * torch.log_softmax(x @ r.T, 1)).sum(1).mean()
        loss.backward()
        opt.step()
    experts = np.stack([g.numpy() for g in groups]).astype(np.int64)
    return sh.numpy().astype(np.int64), experts, r.detach().numpy().astype(np.float32), float(loss.detach())


def build_plan(model, batches, *, num_experts: int, top_k: int, shared: int, temperature: float = 1.0,
               seed: int = 0, router_steps: int = 300, show_progress: bool = True) -> MoEPlan:
    """The plan for a dense model from calibration token batches (a list of
    ``[B, T]`` id tensors): deterministic for a given seed, torch version and
    thread count."""
    import torch

    layers = _dense_layers(model)
    xs = ffn_inputs(model, batches, show_progress)
    it = range(len(layers))
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="experts and routers", leave=False)
    sh_l, ex_l, r_l, losses = [], [], [], []
    for i in it:
        mlp = layers[i].mlp
        w = [p.weight.detach().float() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        sh, ex, r, loss = plan_layer(xs[i], *w, num_experts, shared, router_steps=router_steps, seed=seed + i)
        sh_l.append(sh)
        ex_l.append(ex)
        r_l.append(r)
        losses.append(loss)
        xs[i] = None
    plan = MoEPlan(sh_l, ex_l, r_l, top_k=top_k, temperature=temperature,
                   info={"router_loss": losses, "seed": seed, "router_steps": router_steps,
                         "calibration_tokens": int(sum(b.numel() for b in batches)),
                         "torch": torch.__version__})
    plan.validate(int(model.config.intermediate_size), int(model.config.hidden_size))
    return plan


# ------------------------------------------------------------------ the checkpoint

def transformers_major() -> int:
    """The installed transformers' major version (config layouts differ)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def moe_config(dense_config, plan: MoEPlan):
    """The Qwen2-MoE config of the MoE model (installed transformers)."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, hidden_act="silu",
              max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
              tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), use_sliding_window=False,
              decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=plan.expert_size,
              shared_expert_intermediate_size=plan.shared_size, num_experts=plan.num_experts,
              num_experts_per_tok=plan.top_k, norm_topk_prob=True, qkv_bias=False, attention_dropout=0.0,
              bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"moefication: head_dim {head_dim} is not hidden_size / num_attention_heads")
    rs = rope or getattr(c, "rope_scaling", None) or {}
    if rs.get("rope_type", rs.get("type", "default")) != "default":
        raise ValueError("moefication: RoPE scaling is not supported")
    if transformers_major() >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    else:
        kw["rope_theta"] = float(theta)
    return Qwen2MoeConfig(**kw)


def moe_state_dict(dense_state: Dict, plan: MoEPlan, tie_word_embeddings: bool) -> Dict:
    """The MoE checkpoint's tensors (Hugging Face's per-expert Qwen2-MoE
    names, which both transformers generations load) from the dense model's
    state dict."""
    import torch

    E, k = plan.num_experts, plan.top_k
    out = {}
    for name, t in dense_state.items():
        if ".mlp." in name:
            continue
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        out[name] = t.contiguous()
    for l in range(plan.num_layers):
        p = f"model.layers.{l}.mlp."
        wg, wu, wd = (dense_state[p + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        dt = wg.dtype
        sh = torch.from_numpy(plan.shared[l])
        out[p + "shared_expert.gate_proj.weight"] = wg[sh].contiguous()
        out[p + "shared_expert.up_proj.weight"] = wu[sh].contiguous()
        out[p + "shared_expert.down_proj.weight"] = (wd[:, sh] * 2).contiguous()   # sigmoid(0) = 1/2
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, wg.shape[1], dtype=dt)
        out[p + "gate.weight"] = (torch.from_numpy(plan.routers[l]).double() * plan.temperature).to(dt).contiguous()
        for e in range(E):
            idx = torch.from_numpy(plan.experts[l][e])
            q = p + f"experts.{e}."
            out[q + "gate_proj.weight"] = wg[idx].contiguous()
            out[q + "up_proj.weight"] = wu[idx].contiguous()
            out[q + "down_proj.weight"] = (wd[:, idx] * k).contiguous()
    return out


def convert(dense_model, plan: MoEPlan, out_dir, tokenizer=None) -> None:
    """Writes the MoE checkpoint (config, safetensors weights, tokenizer when
    given) into ``out_dir`` (created)."""
    import pathlib

    from safetensors.torch import save_file

    _dense_layers(dense_model)
    cfg = dense_model.config
    plan.validate(int(cfg.intermediate_size), int(cfg.hidden_size))
    if plan.num_layers != cfg.num_hidden_layers:
        raise ValueError(f"moefication: the plan has {plan.num_layers} layers, the model {cfg.num_hidden_layers}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = moe_config(cfg, plan)
    state = {k: v.detach() for k, v in dense_model.state_dict().items()}
    tensors = moe_state_dict(state, plan, bool(mcfg.tie_word_embeddings))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    mcfg.architectures = ["Qwen2MoeForCausalLM"]
    mcfg.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def select_experts(x, plan_layer_router, top_k: int, temperature: float = 1.0):
    """Reference routing in float64 NumPy (for tests): (indices, combine
    weights times top_k) of the top-k experts of each row of ``x``."""
    z = np.asarray(x, np.float64) @ (np.asarray(plan_layer_router, np.float64) * temperature).T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, 1)
    return idx, w / w.sum(1, keepdims=True) * top_k


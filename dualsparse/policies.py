"""Drop policies: how each (token, selected expert) pair is computed.

A policy turns the top-K routing of one MoE layer into *levels*: the number
of importance partitions each pair computes (0 = dropped, P = the whole
expert), optionally with adjusted combine weights (DynamicSkip).  Decisions use
the top-K-normalised score ``s = w / sum(w)`` of every family; the combine
uses the model's own weights, and survivors are not renormalised (DynamicSkip
is the exception, as in its paper).

Thresholds may be one value for every layer or a per-layer sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np

__all__ = [
    "Policy",
    "NoDrop",
    "Thresholds",
    "OneThreshold",
    "TwoThreshold",
    "DynamicSkip",
    "RandomDrop",
    "TopKReduce",
    "LoadAware",
    "ThresholdRangeWarning",
]

Number = Union[int, float]


def _check_numbers(values, name: str, what: str = "thresholds") -> None:
    """Refuses what NumPy would silently turn into numbers: bools (True ->
    1.0), mappings (a dict's keys), sets (no order), strings; names integers
    too large for a float."""
    if isinstance(values, (bool, np.bool_)):
        raise TypeError(f"{name}: {what} must be numbers; got {values!r} (a bool)")
    if isinstance(values, (dict, set, frozenset, str, bytes)):
        raise TypeError(f"{name}: {what} must be a number or a list / tuple of numbers; got "
                        f"{type(values).__name__}")
    if isinstance(values, np.ndarray) or type(values).__module__.startswith("torch"):
        if str(getattr(values, "dtype", "")) in ("bool", "torch.bool"):
            raise TypeError(f"{name}: {what} must be numbers; got a boolean array")
        return
    if isinstance(values, (list, tuple)):
        for v in values:
            _check_numbers(v, name, what)
        return
    if isinstance(values, int) and not -2 ** 1023 < values < 2 ** 1024:
        raise ValueError(f"{name}: {what} value {values!r} is too large for a float (must be finite)")


class ThresholdRangeWarning(UserWarning):
    """A policy value outside its meaningful range (it saturates)."""


def _warn_outside_unit(table: np.ndarray, name: str) -> None:
    """Normalised scores lie in [0, 1]: a threshold outside saturates."""
    import warnings

    hi, lo = table > 1.0, table < 0.0
    if hi.any():
        warnings.warn(f"{name}: threshold {float(table[hi][0])!r} is above 1; normalised scores lie in [0, 1], "
                      "so no pair reaches it (every pair is dropped at that level)", ThresholdRangeWarning, stacklevel=4)
    if lo.any():
        warnings.warn(f"{name}: threshold {float(table[lo][0])!r} is below 0; normalised scores lie in [0, 1], "
                      "so every pair reaches it (nothing is dropped at that level)", ThresholdRangeWarning, stacklevel=4)


def _as_threshold_table(values, name: str) -> np.ndarray:
    """(L or 1, P) float64 table from P numbers or from L rows of P numbers."""
    _check_numbers(values, name)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name}: thresholds must be numbers; got {values!r}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] < 1:
        raise ValueError(f"{name}: thresholds must be P numbers or one row of P numbers per layer; got shape {arr.shape}")
    if arr.shape[1] > 127:
        raise ValueError(f"{name}: at most 127 thresholds per layer; got {arr.shape[1]}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{name}: threshold {arr[i, j]} (layer row {i}, position {j}) is not finite")
    dec = np.diff(arr, axis=1) < 0
    if dec.any():
        i, j = map(int, np.argwhere(dec)[0])
        raise ValueError(f"{name}: thresholds must be ascending; got {arr[i, j]} before {arr[i, j + 1]}"
                         + (f" in layer {i}" if arr.shape[0] > 1 else ""))
    return arr


class Policy:
    """Base class.  Subclasses define ``num_partitions`` and ``route``."""

    #: importance partitions per expert (P): levels are in [0, P]
    num_partitions: int = 1
    #: whether routing weights change (DynamicSkip renormalises)
    changes_weights: bool = False

    def route(self, topk_weights, topk_ids, layer: int, generator=None):
        """(levels or None, weights or None) for one layer.

        ``levels`` is a (T, K) int8 tensor in [0, P] (None: every pair runs
        fully); ``weights`` replaces the combine weights when not None."""
        raise NotImplementedError

    def check_layers(self, num_layers: int) -> None:
        """Raise if per-layer values do not match the model's MoE layers."""

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class NoDrop(Policy):
    """Every selected expert runs fully (the unpatched model's computation)."""

    num_partitions: int = field(default=1, init=False)

    def route(self, topk_weights, topk_ids, layer, generator=None):
        return None, None

    def describe(self):
        return "NoDrop"


class Thresholds(Policy):
    """P importance partitions: a pair computes as many partitions as
    thresholds its normalised score reaches (``s >= t_j``).

    ``Thresholds([t1, ..., tP])`` applies to every layer;
    ``Thresholds([[...], [...], ...])`` gives one row per MoE layer.

    Range: normalised scores ``s = w / sum(w)`` lie in [0, 1], so the
    meaningful thresholds do too.  A value outside is accepted (it saturates:
    above 1 no pair reaches it, at or below 0 every pair does) but a
    :class:`ThresholdRangeWarning` (a ``UserWarning``) says so, since it is
    usually a mistake (a percentage, a sign).  With ``normalize=False`` the thresholds apply to the raw weights
    and any finite value is accepted silently.  Bools, dicts, sets and
    non-finite values are refused."""

    def __init__(self, thresholds, *, normalize: bool = True):
        self.table = _as_threshold_table(thresholds, type(self).__name__)
        if normalize:
            _warn_outside_unit(self.table, type(self).__name__)
        self.table.setflags(write=False)
        self.num_partitions = int(self.table.shape[1])
        self.normalize = bool(normalize)

    @property
    def per_layer(self) -> bool:
        return self.table.shape[0] > 1

    def thresholds(self, layer: int) -> List[float]:
        row = self.table[layer if self.per_layer else 0]
        return [float(v) for v in row]

    def check_layers(self, num_layers):
        if self.per_layer and self.table.shape[0] != num_layers:
            raise ValueError(f"{type(self).__name__} has thresholds for {self.table.shape[0]} layers but the model "
                             f"has {num_layers} MoE layers")

    def route(self, topk_weights, topk_ids, layer, generator=None):
        from .ops import route_levels

        return route_levels(topk_weights, self.thresholds(layer), normalize=self.normalize), None

    def __eq__(self, other):
        return (type(self) is type(other) and self.normalize == other.normalize
                and np.array_equal(self.table, other.table))

    def __hash__(self):
        return hash((type(self).__name__, self.table.tobytes(), self.normalize))

    def _fmt(self):
        if self.per_layer:
            return f"per-layer {self.table.shape[0]}x{self.num_partitions}"
        return "/".join(f"{v:.4g}" for v in self.table[0])

    def __repr__(self):
        if self.per_layer:
            return f"{type(self).__name__}(<{self.table.shape[0]} layers>)"
        return f"{type(self).__name__}({[float(v) for v in self.table[0]]})"

    def describe(self):
        return f"{type(self).__name__}({self._fmt()})"


class OneThreshold(Thresholds):
    """1T-Drop: drop a pair when its normalised score is below ``t``
    (one value, or one per MoE layer).  ``t`` is meaningful in [0, 1]
    (outside it a ``UserWarning`` is given: above 1 drops every pair, below 0
    none; see :class:`Thresholds`)."""

    def __init__(self, t: Union[Number, Sequence[Number]]):
        _check_numbers(t, "OneThreshold", "t")
        try:
            t_arr = np.asarray(t, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"OneThreshold: t must be a number or one number per layer; got {t!r}") from None
        if t_arr.ndim == 0:
            table = [[float(t_arr)]]
        elif t_arr.ndim == 1:
            table = [[float(v)] for v in t_arr]
        else:
            raise ValueError(f"OneThreshold: t must be a number or one number per layer; got shape {t_arr.shape}")
        super().__init__(table)

    def __repr__(self):
        if self.per_layer:
            return f"OneThreshold(<{self.table.shape[0]} layers>)"
        return f"OneThreshold({float(self.table[0, 0])!r})"


class TwoThreshold(Thresholds):
    """2T-Drop with major/minor halves: ``s >= t_minor`` runs the whole
    expert, ``t_major <= s < t_minor`` only its major half, ``s < t_major``
    drops it.  ``TwoThreshold(t, t)`` is exactly ``OneThreshold(t)``.  Each
    argument may be a number or one number per MoE layer.  Both are
    meaningful in [0, 1] (outside it a ``UserWarning`` is given; see
    :class:`Thresholds`)."""

    def __init__(self, t_major: Union[Number, Sequence[Number]], t_minor: Union[Number, Sequence[Number]]):
        _check_numbers(t_major, "TwoThreshold", "t_major")
        _check_numbers(t_minor, "TwoThreshold", "t_minor")
        try:
            a = np.atleast_1d(np.asarray(t_major, dtype=np.float64))
            b = np.atleast_1d(np.asarray(t_minor, dtype=np.float64))
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"TwoThreshold: t_major and t_minor must be numbers or one number per layer; got "
                            f"{t_major!r}, {t_minor!r}") from None
        if a.ndim != 1 or b.ndim != 1:
            raise ValueError("TwoThreshold: t_major and t_minor must be numbers or one number per layer")
        if a.shape != b.shape and 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(f"TwoThreshold: t_major has {a.shape[0]} layers but t_minor has {b.shape[0]}")
        a, b = np.broadcast_arrays(a, b)
        if np.any(np.isfinite(a) & np.isfinite(b) & (a > b)):
            i = int(np.argmax(a > b))
            raise ValueError(f"TwoThreshold: t_major ({a[i]}) must not exceed t_minor ({b[i]})")
        super().__init__(np.stack([a, b], axis=1))

    @classmethod
    def around(cls, t, delta: float = 0.01):
        """The paper's default pair: ``TwoThreshold(t - delta, t + delta)``."""
        t = np.asarray(t, dtype=np.float64)
        return cls(t - delta, t + delta)

    def __repr__(self):
        if self.per_layer:
            return f"TwoThreshold(<{self.table.shape[0]} layers>)"
        return f"TwoThreshold({float(self.table[0, 0])!r}, {float(self.table[0, 1])!r})"


class DynamicSkip(Policy):
    """Expert skipping of "Not All Experts are Equal" (the baseline): skip the
    k-th selected expert (k >= 2, by descending score) when
    ``s_k < beta_k * s_1``, then renormalise the survivors to the original
    weight sum.  ``beta`` per layer (and per rank k >= 2) is the median of
    ``s_k / s_1`` on calibration data: build it with
    :func:`dualsparse.calibrate_dynamic_skip`.

    Range: ``s_k / s_1`` lies in [0, 1] (scores sorted descending), so betas
    are meaningful in [0, 1]; negative betas are refused, and a beta above 1
    (which skips every expert but the first) is accepted with a
    ``UserWarning``."""

    changes_weights = True

    def __init__(self, betas: Optional[Sequence] = None):
        if betas is None:
            self.betas = None
        else:
            _check_numbers(betas, "DynamicSkip", "betas")
            try:
                arr = np.asarray(betas, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                raise TypeError(f"DynamicSkip: betas must be numbers; got {betas!r}") from None
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError("DynamicSkip: betas must be finite, non-negative, one row per MoE layer "
                                 "(one value per rank k >= 2)")
            if np.any(arr > 1):
                import warnings

                warnings.warn(f"DynamicSkip: beta {float(arr[arr > 1][0])!r} is above 1; s_k / s_1 lies in "
                              "[0, 1], so every expert but the first is skipped", ThresholdRangeWarning, stacklevel=2)
            self.betas = arr
        self.num_partitions = 1

    def check_layers(self, num_layers):
        if self.betas is None:
            raise ValueError("DynamicSkip needs calibrated betas: policy = ds.calibrate_dynamic_skip(model, batches)")
        if self.betas.shape[0] != num_layers:
            raise ValueError(f"DynamicSkip has betas for {self.betas.shape[0]} layers but the model has "
                             f"{num_layers} MoE layers")

    def route(self, topk_weights, topk_ids, layer, generator=None):
        import torch

        w = topk_weights.float()
        K = w.shape[1]
        if K < 2:
            return None, None
        order = torch.argsort(w, dim=1, descending=True, stable=True)
        ws = torch.gather(w, 1, order)
        beta = torch.as_tensor(self.betas[layer], dtype=torch.float32)
        if beta.numel() == 1:
            beta = beta.expand(K - 1)
        if beta.numel() != K - 1:
            raise ValueError(f"DynamicSkip: layer {layer} has {beta.numel()} betas but top-k is {K}")
        keep_sorted = torch.ones_like(ws, dtype=torch.bool)
        keep_sorted[:, 1:] = ws[:, 1:] >= beta[None, :] * ws[:, :1]
        keep = torch.empty_like(keep_sorted)
        keep.scatter_(1, order, keep_sorted)
        levels = keep.to(torch.int8)
        total = w.sum(1, keepdim=True)
        kept = (w * keep).sum(1, keepdim=True)
        scale = torch.where(kept > 0, total / kept, torch.ones_like(kept))
        new_w = (w * keep * scale).to(topk_weights.dtype)
        return levels, new_w

    def __repr__(self):
        if self.betas is None:
            return "DynamicSkip(<uncalibrated>)"
        return f"DynamicSkip(<{self.betas.shape[0]} layers>)"

    def describe(self):
        if self.betas is None:
            return "DynamicSkip(uncalibrated)"
        return f"DynamicSkip(median beta {float(np.median(self.betas)):.3f})"


class RandomDrop(Policy):
    """Drops each (token, expert) pair independently with probability ``rate``
    (a reproducible baseline: ``seed`` fixes the sequence)."""

    def __init__(self, rate: float, seed: int = 0):
        if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
            raise TypeError(f"RandomDrop: rate must be a number in [0, 1]; got {type(rate).__name__} {rate!r}")
        rate = float(rate)
        if not (0.0 <= rate <= 1.0):
            raise ValueError(f"RandomDrop: rate must be in [0, 1]; got {rate}")
        self.rate = rate
        self.seed = int(seed)
        self.num_partitions = 1

    def route(self, topk_weights, topk_ids, layer, generator=None):
        import torch

        u = torch.rand(topk_weights.shape, generator=generator, device="cpu")
        return (u >= self.rate).to(torch.int8).to(topk_weights.device), None

    def __repr__(self):
        return f"RandomDrop({self.rate!r}, seed={self.seed})"


class TopKReduce(Policy):
    """Keeps only the ``k`` highest-scoring of the K selected experts (the
    others are dropped; the kept weights are unchanged)."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"TopKReduce: k must be a non-negative int; got {k!r}")
        self.k = int(k)
        self.num_partitions = 1

    def route(self, topk_weights, topk_ids, layer, generator=None):
        import torch

        K = topk_weights.shape[1]
        if self.k >= K:
            return None, None
        order = torch.argsort(topk_weights.float(), dim=1, descending=True, stable=True)
        keep = torch.zeros(topk_weights.shape, dtype=torch.int8, device=topk_weights.device)
        keep.scatter_(1, order[:, : self.k], 1)
        return keep, None

    def __repr__(self):
        return f"TopKReduce({self.k})"


class LoadAware(Policy):
    """Load-aware thresholds for expert parallelism (METHOD.md section 6).

    ``base`` is a :class:`Thresholds` policy (``OneThreshold``,
    ``TwoThreshold``, ``Thresholds``; one row or one per layer) whose values
    are the *maximum* thresholds T_max.  Under expert parallelism, per MoE
    layer and batch, the pairs whose expert (or sub-expert) lives on rank d
    use the thresholds ``T_d = c_d * T_max`` with a factor ``c_d <= 1`` per
    rank.  Loads are expert-computation units routed to a rank, over all
    ranks' tokens.  ``rule`` picks ``c_d``:

    * ``"ratio"`` (the paper's reading): ``c_d = min(1, r_d)`` with
      ``r_d = load_d / mean load`` before dropping: ranks at or above the
      mean keep T_max, the others drop less in proportion to their ratio.
      One all_gather of the ranks' loads per layer.
    * ``"fill"``: the most loaded rank after dropping at T_max sets the bar
      ``M = max_d load_d(T_max)``; every rank takes the smallest factor on a
      grid of ``steps`` (``c = i / steps``) whose load after dropping stays at
      or below M.  No rank then works longer than at T_max and each drops as
      little as the bar allows (the goal stated in section 6).  One
      all_reduce of a per-rank histogram of the pairs' score / threshold
      ratios (ranks x (steps + 1) numbers) per layer; plain EP only
      (``sub_experts=1``).

    Without expert parallelism (one rank) it is exactly ``base``; ``base``
    on its own is the uniform comparison."""

    RULES = ("ratio", "fill")

    def __init__(self, base: Policy, rule: str = "ratio", steps: int = 256):
        if not isinstance(base, Thresholds):
            raise TypeError(f"LoadAware: base must be a thresholds policy (OneThreshold, TwoThreshold, Thresholds) "
                            f"whose values are the maximum thresholds; got {type(base).__name__}")
        if rule not in self.RULES:
            raise ValueError(f"LoadAware: rule must be one of {self.RULES}; got {rule!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not (1 <= steps <= 65536):
            raise ValueError(f"LoadAware: steps must be an int in [1, 65536]; got {steps!r}")
        if rule == "fill" and np.any(base.table < 0):
            raise ValueError("LoadAware: rule='fill' needs non-negative thresholds")
        self.base = base
        self.rule = rule
        self.steps = int(steps)
        self.num_partitions = base.num_partitions
        self.normalize = base.normalize

    @property
    def table(self) -> np.ndarray:
        return self.base.table

    def thresholds(self, layer: int) -> List[float]:
        return self.base.thresholds(layer)

    def check_layers(self, num_layers):
        self.base.check_layers(num_layers)

    def route(self, topk_weights, topk_ids, layer, generator=None):
        return self.base.route(topk_weights, topk_ids, layer, generator)

    @staticmethod
    def scale(loads) -> np.ndarray:
        """Threshold factor ``min(1, r_d)`` of every rank from the ranks'
        loads before dropping (all 1 when nothing is routed)."""
        loads = np.asarray(loads, dtype=np.float64)
        mean = loads.mean() if loads.size else 0.0
        if not mean > 0:
            return np.ones_like(loads)
        return np.minimum(1.0, loads / mean)

    def __eq__(self, other):
        return (type(self) is type(other) and self.base == other.base and self.rule == other.rule
                and self.steps == other.steps)

    def __hash__(self):
        return hash(("LoadAware", hash(self.base), self.rule, self.steps))

    def _opts(self):
        return "" if self.rule == "ratio" else f", rule='fill', steps={self.steps}"

    def __repr__(self):
        return f"LoadAware({self.base!r}{self._opts()})"

    def describe(self):
        return f"LoadAware({self.base.describe()}{self._opts()})"


# ------------------------------------------------------- serialisation

def _table_arg(col: np.ndarray):
    """One value for every layer, or the per-layer list."""
    return float(col[0]) if col.shape[0] == 1 else [float(v) for v in col]


def policy_to_dict(policy: Policy) -> dict:
    """A JSON-ready description of ``policy`` that :func:`policy_from_dict`
    turns back into an equal policy (thresholds exactly: JSON keeps every
    float64 digit)."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy_to_dict: policy must be a dualsparse policy; got {type(policy).__name__}")
    kind = type(policy).__name__
    if isinstance(policy, NoDrop):
        return {"type": "NoDrop"}
    if isinstance(policy, Thresholds):
        d = {"type": kind, "thresholds": [[float(v) for v in row] for row in policy.table]}
        if kind == "Thresholds":
            d["normalize"] = bool(policy.normalize)
        elif kind not in ("OneThreshold", "TwoThreshold"):
            raise TypeError(f"policy_to_dict: cannot describe the Thresholds subclass {kind}")
        return d
    if isinstance(policy, DynamicSkip):
        if policy.betas is None:
            raise ValueError("policy_to_dict: DynamicSkip is not calibrated (no betas to save)")
        return {"type": "DynamicSkip", "betas": [[float(v) for v in row] for row in policy.betas]}
    if isinstance(policy, RandomDrop):
        return {"type": "RandomDrop", "rate": policy.rate, "seed": policy.seed}
    if isinstance(policy, TopKReduce):
        return {"type": "TopKReduce", "k": policy.k}
    if isinstance(policy, LoadAware):
        return {"type": "LoadAware", "base": policy_to_dict(policy.base), "rule": policy.rule, "steps": policy.steps}
    raise TypeError(f"policy_to_dict: cannot describe a {kind} policy")


def policy_from_dict(d: dict) -> Policy:
    """The policy described by ``d`` (from :func:`policy_to_dict`); a clear
    error names what is missing or wrong."""
    if not isinstance(d, dict):
        raise TypeError(f"policy_from_dict: expected a dict with a 'type'; got {type(d).__name__}")
    kind = d.get("type")

    def need(key):
        if key not in d:
            raise ValueError(f"policy_from_dict: a {kind} policy needs {key!r}; got keys {sorted(d)}")
        return d[key]

    if kind == "NoDrop":
        return NoDrop()
    if kind in ("OneThreshold", "TwoThreshold", "Thresholds"):
        table = np.asarray(need("thresholds"), dtype=np.float64)
        if table.ndim != 2 or table.shape[0] < 1:
            raise ValueError(f"policy_from_dict: {kind} thresholds must be a list of rows; got shape {table.shape}")
        if kind == "OneThreshold":
            if table.shape[1] != 1:
                raise ValueError(f"policy_from_dict: OneThreshold rows hold one value; got {table.shape[1]}")
            return OneThreshold(_table_arg(table[:, 0]))
        if kind == "TwoThreshold":
            if table.shape[1] != 2:
                raise ValueError(f"policy_from_dict: TwoThreshold rows hold two values; got {table.shape[1]}")
            return TwoThreshold(_table_arg(table[:, 0]), _table_arg(table[:, 1]))
        return Thresholds(table if table.shape[0] > 1 else table[0], normalize=bool(d.get("normalize", True)))
    if kind == "DynamicSkip":
        return DynamicSkip(need("betas"))
    if kind == "RandomDrop":
        return RandomDrop(need("rate"), seed=int(d.get("seed", 0)))
    if kind == "TopKReduce":
        return TopKReduce(int(need("k")))
    if kind == "LoadAware":
        return LoadAware(policy_from_dict(need("base")), rule=d.get("rule", "ratio"), steps=int(d.get("steps", 256)))
    raise ValueError(f"policy_from_dict: unknown policy type {kind!r}; known: NoDrop, OneThreshold, TwoThreshold, "
                     "Thresholds, DynamicSkip, RandomDrop, TopKReduce, LoadAware")


Policy.to_dict = policy_to_dict
Policy.from_dict = staticmethod(policy_from_dict)
__all__ += ["policy_to_dict", "policy_from_dict"]

"""Tuned drop policies: search the importance metric, the threshold band,
the number of partitions and global or per-layer thresholds on calibration
text, and keep the setting with the lowest calibration loss."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..policies import NoDrop, Policy
from .batches import collect_batches
from .patching import get_handle, patch
from .profile import METRICS, _permute_gpt_oss, profile
from .search import _record, _search

#: the default grid (see :func:`tune_policy`)
DEFAULT_METRICS = ("abs_gate", "abs_gate_up")
DEFAULT_BANDS = (0.03, 0.05, 0.08)
DEFAULT_PARTITIONS = (2, 4)
DEFAULT_PER_LAYER = (False, True)


@dataclass
class Candidate:
    """One point of the grid: its settings and what it measured (or why it
    was skipped).  ``drop_rate``: the overall drop rate on the calibration
    part used for the threshold search; ``holdout_drop_rate`` and ``loss``
    (mean next-token loss in nats per token): on the held-out part."""

    metric: str
    num_partitions: int
    per_layer: bool
    band: float
    policy: Optional[Policy] = None
    drop_rate: Optional[float] = None
    holdout_drop_rate: Optional[float] = None
    loss: Optional[float] = None
    within_tolerance: bool = False
    skipped: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def thresholds(self) -> List[float]:
        """The band's threshold offsets from T (T - b, T + b for two
        partitions; T - 1.5b ... T + 1.5b, b apart, for four)."""
        half = _half_width(self.num_partitions, self.band)
        P = self.num_partitions
        return [-half + 2 * half * j / (P - 1) for j in range(P)] if P > 1 else [0.0]

    def settings(self) -> str:
        return (f"{self.metric}, P={self.num_partitions}, {'per-layer' if self.per_layer else 'global'}, "
                f"band {self.band:g}")


@dataclass
class TuneResult:
    """What :func:`tune_policy` returns.  The model is left reconstructed by
    ``metric`` (neurons in descending importance from the order it had when
    tuning started) and patched with ``policy``."""

    policy: Policy
    metric: str
    num_partitions: int
    per_layer: bool
    band: float
    target_drop_rate: float
    tolerance: float
    drop_rate: float
    loss: float
    nodrop_loss: float
    candidates: List[Candidate]
    importance: object = None       # the Importance profiled on the order tuning started from
    calibration_tokens: int = 0
    holdout_tokens: int = 0

    @property
    def chosen(self) -> Candidate:
        for c in self.candidates:
            if c.policy is self.policy:
                return c
        raise LookupError("the chosen candidate is not in the list")  # pragma: no cover

    def table(self) -> str:
        hdr = f"{'metric':<12} {'P':>2} {'T':<10} {'band':>6} {'drop':>7} {'held-out':>8} " \
              f"{'loss':>9} {'d loss':>9}"
        lines = [hdr, "-" * len(hdr)]
        for c in self.candidates:
            mark = " <- chosen" if c.policy is self.policy else ""
            where = "per-layer" if c.per_layer else "global"
            if c.skipped:
                lines.append(f"{c.metric:<12} {c.num_partitions:>2} {where:<10} {c.band:>6g}  skipped: {c.skipped}")
                continue
            off = "" if c.within_tolerance else "  (drop rate off target)"
            lines.append(f"{c.metric:<12} {c.num_partitions:>2} {where:<10} {c.band:>6g} {100 * c.drop_rate:6.2f}% "
                         f"{100 * c.holdout_drop_rate:7.2f}% {c.loss:9.5f} {c.loss - self.nodrop_loss:+9.5f}{off}{mark}")
        return "\n".join(lines)

    def __repr__(self):
        c = self.chosen
        return (f"<TuneResult target {100 * self.target_drop_rate:.1f}% drop: {c.settings()} -> {self.policy!r}; "
                f"calibration drop {100 * self.drop_rate:.2f}%, held-out calibration loss {self.loss:.5f} nats/token "
                f"(no drop {self.nodrop_loss:.5f}, {self.calibration_tokens} search + {self.holdout_tokens} held-out "
                f"tokens)>\n{self.table()}")

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(repr(self))


# ------------------------------------------------------------------ helpers

def _split(data, holdout: float):
    """(search batches, held-out batches): rows spread evenly over the
    batches go to the held-out part (``holdout`` of them, at least one)."""
    n = sum(int(ids.shape[0]) for ids, _ in data)
    n_hold = int(round(holdout * n))
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"dualsparse.tune_policy: calibration_batches hold {n} rows; holding out {holdout:g} of them "
                         f"leaves {'no held-out row' if n_hold < 1 else 'no row for the search'}; give more rows "
                         f"(for example more or larger batches) or change holdout")
    hold_idx = {int(math.floor((k + 0.5) * n / n_hold)) for k in range(n_hold)}
    search, held = [], []
    g = 0
    for ids, mask in data:
        sel = torch.tensor([(g + i) in hold_idx for i in range(ids.shape[0])])
        g += ids.shape[0]
        for part, keep in ((held, sel), (search, ~sel)):
            if bool(keep.any()):
                part.append((ids[keep], None if mask is None else mask[keep]))
    return search, held


def _as_batches(data):
    """Validated (ids, mask) pairs back as batches the public functions take."""
    return [ids if mask is None else {"input_ids": ids, "attention_mask": mask} for ids, mask in data]


def _tokens(data) -> int:
    return int(sum(int(ids.numel() if m is None else m.sum()) for ids, m in data))


def _mean_loss(model, h, data) -> float:
    """Mean next-token cross entropy (nats/token) over the batches, padding
    excluded; the patched layers see each batch's token mask."""
    nll, n = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in data:
                if ids.shape[1] < 2:
                    continue
                h.token_mask = None if mask is None else mask.reshape(-1).bool()
                kw = {} if mask is None else {"attention_mask": mask}
                logits = model(input_ids=ids, use_cache=False, **kw).logits[:, :-1].float()
                tgt = ids[:, 1:]
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                       reduction="none").double()
                if mask is not None:
                    keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1)
                    ce = ce[keep]
                nll += float(ce.sum())
                n += int(ce.numel())
    finally:
        h.token_mask = None
        model.train(was_training)
    if n == 0:
        raise ValueError("dualsparse.tune_policy: the held-out rows have no next-token target (rows of one token?)")
    return nll / n


class _Order:
    """The neuron order of every layer relative to the order tuning started
    from; moves the model's weights to any order derived from that one."""

    def __init__(self, h, num_threads):
        self.h = h
        self.nt = num_threads
        self.cur = [np.tile(np.arange(l.intermediate, dtype=np.int64), (l.num_experts, 1)) for l in h.layers]

    def _apply(self, layer, perm):
        if layer.family.gpt_oss:
            _permute_gpt_oss(layer.experts, perm)
        else:
            gu, dn = layer.fused_weights()
            ops.permute_neurons(gu, dn, perm, num_threads=self.nt)

    def move_to(self, target: Sequence[np.ndarray]):
        """target[layer][e, j]: the starting-order index of the neuron that
        should sit at position j."""
        for i, (layer, cur, tgt) in enumerate(zip(self.h.layers, self.cur, target)):
            tgt = np.asarray(tgt, dtype=np.int64)
            if np.array_equal(cur, tgt):
                continue
            inv = np.argsort(cur, axis=1)
            perm = np.take_along_axis(inv, tgt, axis=1)
            self._apply(layer, np.ascontiguousarray(perm))
            self.cur[i] = tgt.copy()

    def identity(self):
        return [np.tile(np.arange(c.shape[1], dtype=np.int64), (c.shape[0], 1)) for c in self.cur]


def _check_grid(name, values, allowed=None, kind=None):
    vals = list(values) if isinstance(values, (list, tuple)) else None
    if vals is None:
        raise TypeError(f"dualsparse.tune_policy: {name} must be a list or tuple; got {type(values).__name__}")
    if not vals:
        raise ValueError(f"dualsparse.tune_policy: {name} is empty; the candidate grid would be empty")
    if len(set(vals)) != len(vals):
        raise ValueError(f"dualsparse.tune_policy: {name} repeats a value: {vals}")
    for v in vals:
        if allowed is not None and v not in allowed:
            raise ValueError(f"dualsparse.tune_policy: {name}: {v!r} is not one of {allowed}")
        if kind == "band" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                               or v < 0 or v >= 0.5):
            raise ValueError(f"dualsparse.tune_policy: bands: every band must be a number in [0, 0.5); got {v!r}")
        if kind == "P" and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 2 <= v <= 127):
            raise ValueError(f"dualsparse.tune_policy: partitions: every entry must be an int in [2, 127]; got {v!r}")
        if kind == "bool" and not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"dualsparse.tune_policy: per_layer: entries must be True or False; got {v!r}")
    return vals


def _half_width(P: int, band: float) -> float:
    """Half the span of the thresholds around T: b for two partitions
    (T - b, T + b), else b (P - 1) / 2 (P thresholds b apart: T - 1.5b ...
    T + 1.5b for four)."""
    return band if P == 2 else band * (P - 1) / 2


def _skip_reason(h, P: int) -> Optional[str]:
    for layer in h.layers:
        I = layer.intermediate
        if P > I:
            return f"{P} partitions exceed the {I} neurons of {layer.name}'s experts"
        if I % P:
            return (f"{P} partitions do not divide the {I} neurons of {layer.name}'s experts (partitions would be "
                    "unequal and the drop accounting inexact)")
    return None


# ------------------------------------------------------------------ the search

def tune_policy(model, calibration_batches, target_drop_rate: float, *, metrics=DEFAULT_METRICS,
                bands=DEFAULT_BANDS, partitions=DEFAULT_PARTITIONS, per_layer=DEFAULT_PER_LAYER,
                holdout: float = 0.25, tolerance: float = 0.01, num_threads=None,
                show_progress: bool = True) -> TuneResult:
    """Tunes a threshold policy for ``target_drop_rate`` on calibration text.

    The rows of ``calibration_batches`` (input_ids tensors or tokenizer
    outputs) are split: ``holdout`` of them (spread evenly) score the
    candidates by their mean next-token loss (nats/token); the rest are used
    to profile neuron importance (one pass yields every metric) and to find
    each candidate's thresholds with :func:`find_thresholds`.  The grid is
    ``metrics`` x ``partitions`` x ``per_layer`` x ``bands``:

    * ``metrics``: importance metrics the experts are reconstructed by
      (default ``("abs_gate", "abs_gate_up")``; all four: ``ops.METRICS``);
    * ``bands``: b, the spacing of the thresholds around the solved T: two
      partitions use ``T - b, T + b`` (the paper's 2T-Drop with b = 0.01);
      four use ``T - 1.5b, T - 0.5b, T + 0.5b, T + 1.5b`` (b apart, spanning
      3b, about the span of the two-partition band), and any other P spreads
      P thresholds b apart (default ``(0.03, 0.05, 0.08)``: on the built-in
      models at 25-50% drop the paper's 0.01 keeps much less of the loss
      than 0.03-0.05, and 0.08 won on ``mixtral``);
    * ``partitions``: P, the number of partitions (default ``(2, 4)``); a P
      that does not divide the experts' intermediate size is skipped and
      listed with the reason;
    * ``per_layer``: one global T, or one T per MoE layer (default both).

    Among the candidates whose drop rate on the search part is within
    ``tolerance`` of the target, the lowest held-out calibration loss wins
    (if none is, the closest drop rate wins, with a warning).  The model is
    left reconstructed by the chosen metric (neurons ordered from the order
    it had on entry; outputs without dropping are unchanged) and patched
    with the chosen policy (patched first if it was not).  Arguments are
    checked before anything changes; if the search fails the model gets its
    neuron order and patch state back.  Returns a :class:`TuneResult`.
    """
    fn = "tune_policy"
    target = float(target_drop_rate) if isinstance(target_drop_rate, (int, float, np.floating)) \
        and not isinstance(target_drop_rate, bool) else float("nan")
    if not (0.0 < target < 1.0):
        raise ValueError(f"dualsparse.{fn}: target_drop_rate must be a number in (0, 1); got {target_drop_rate!r}")
    metrics = _check_grid("metrics", metrics, METRICS)
    bands = [float(b) for b in _check_grid("bands", bands, kind="band")]
    partitions = [int(p) for p in _check_grid("partitions", partitions, kind="P")]
    per_layer = [bool(v) for v in _check_grid("per_layer", per_layer, kind="bool")]
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not (0.0 < holdout < 1.0):
        raise ValueError(f"dualsparse.{fn}: holdout must be a fraction in (0, 1); got {holdout!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (0.0 < tolerance < 1.0):
        raise ValueError(f"dualsparse.{fn}: tolerance must be in (0, 1); got {tolerance!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"dualsparse.{fn}: model must be a torch.nn.Module (a transformers model); "
                        f"got {type(model).__name__}")
    data = collect_batches(model, calibration_batches, fn)
    search_data, held = _split(data, float(holdout))
    search_batches = _as_batches(search_data)
    existing = get_handle(model)
    if existing is not None and not existing.reverted and existing.ep is not None:
        raise ValueError(f"dualsparse.{fn}: the model is patched with expert_parallel; tune on one process without "
                         "it, then patch with expert_parallel and the tuned policy")

    was_patched = existing is not None and not existing.reverted
    h = patch(model, num_threads=num_threads) if not was_patched else existing
    saved_policy = h.policy
    order = _Order(h, num_threads)
    ok = False
    try:
        h.set_policy(NoDrop())
        reasons = {P: _skip_reason(h, P) for P in partitions}
        if all(reasons.values()):
            raise ValueError(f"dualsparse.{fn}: every candidate is impossible on this model: "
                             + "; ".join(f"P={P}: {r}" for P, r in reasons.items()))
        imp = profile(model, search_batches, metrics[0], num_threads=num_threads, show_progress=False)
        nodrop_loss = _mean_loss(model, h, held)
        # the scores without dropping, shared by every search (NoDrop outputs do not depend on the order)
        first, _ = _record(model, search_batches, fn, "recording routing scores", num_threads, False)

        cands: List[Candidate] = []
        for m in metrics:
            for P in partitions:
                for pl in per_layer:
                    for b in bands:
                        cands.append(Candidate(m, P, pl, b))
        for c in cands:
            c.skipped = reasons[c.num_partitions]
        runnable = [c for c in cands if c.skipped is None]
        bar = None
        if show_progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(runnable), desc=f"tune_policy {100 * target:.0f}%", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        try:
            for m in metrics:
                order.move_to(imp.order(m))
                for c in (c for c in runnable if c.metric == m):
                    if bar is not None:
                        bar.set_postfix_str(c.settings())
                    delta = _half_width(c.num_partitions, c.band)
                    with warnings.catch_warnings(record=True) as wl:
                        warnings.simplefilter("always")
                        pol = _search(model, search_data, target, c.num_partitions, c.per_layer, delta, tolerance, 6,
                                      num_threads, False, first_scores=first)
                    c.notes.extend(str(w.message) for w in wl)
                    c.policy = pol
                    c.drop_rate = float(pol.search["drop_rate"])
                    c.within_tolerance = bool(abs(c.drop_rate - target) <= tolerance)
                    h.set_policy(pol)
                    h.reset_stats()
                    c.loss = _mean_loss(model, h, held)
                    c.holdout_drop_rate = h.stats().overall
                    h.set_policy(NoDrop())
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        ok_c = [c for c in runnable if c.within_tolerance]
        if ok_c:
            best = min(ok_c, key=lambda c: c.loss)
        else:
            best = min(runnable, key=lambda c: (abs(c.drop_rate - target), c.loss))
            warnings.warn(f"dualsparse.{fn}: no candidate reached the target drop rate {target:.3f} within "
                          f"{tolerance:.3f} on the calibration batches; chose the closest ({best.settings()}, "
                          f"{best.drop_rate:.3f})", RuntimeWarning, stacklevel=2)
        order.move_to(imp.order(best.metric))
        h.set_policy(best.policy)
        h.reset_stats()
        ok = True
    finally:
        if not ok:
            # give the model back as it came: starting neuron order, policy, patch state
            try:
                order.move_to(order.identity())
            finally:
                if was_patched:
                    h.policy = saved_policy
                else:
                    h.revert()
    imp.metric = best.metric
    return TuneResult(best.policy, best.metric, best.num_partitions, best.per_layer, best.band, target,
                      float(tolerance), best.drop_rate, best.loss, nodrop_loss, cands, imp,
                      _tokens(search_data), _tokens(held))


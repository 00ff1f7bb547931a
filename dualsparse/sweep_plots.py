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
    "DynamicSkip": dict(color="tab:green", marker="^"),
    "RandomDrop": dict(color="tab:gray", marker="x"),
    "TopKReduce": dict(color="tab:purple", marker="v"),
}


def _series(rows, method, key):
    pts = sorted((r["drop_rate"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None
                 and r.get("drop_rate") is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_accuracy(result: Dict, out: pathlib.Path) -> pathlib.Path:
    models = result["models"]
    panels = [("d_acc_pts", "next-token accuracy change (points)"), ("d_ppl_pct", "perplexity change (%)"),
              ("mc_acc", "next-sentence multiple choice accuracy")]
    fig = Figure(figsize=(5 * len(panels), 3.6 * len(models)))
    axes = fig.subplots(len(models), len(panels), squeeze=False)
    for i, m in enumerate(models):
        rows = m["rows"]
        nod = next(r for r in rows if r["method"] == "no drop")
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            base = 100 * nod["mc_acc"] if key == "mc_acc" else 0.0
            scale = 100.0 if key == "mc_acc" else 1.0
            # the y range follows the methods that keep the routing's order;
            # RandomDrop is usually far off and would flatten them
            near = [scale * y for meth in STYLE if meth != "RandomDrop" for y in _series(rows, meth, key)[1]]
            lo, hi = min(near + [base]), max(near + [base])
            pad = 0.15 * (hi - lo) if hi > lo else 0.5
            for meth, st in STYLE.items():
                xs, ys = _series(rows, meth, key)
                if xs:
                    ys = [scale * y for y in ys]
                    off = any(y < lo - pad or y > hi + pad for y in ys)
                    ax.plot([100 * x for x in xs], ys, label=meth + (" (off scale)" if off else ""), **st)
            ax.axhline(base, color="black", lw=0.8, ls="--", label="no drop")
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel("measured drop rate (%)")
            ax.set_title(f"{m['info']['name']}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
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
    models = result["models"]
    fig, axes = _panel_per_model(models)
    for ax, m in zip(axes, models):
        rows = m["rows"]
        top = 0.0
        for meth, st in STYLE.items():
            xs, ys = _series(rows, meth, "moe_speedup")
            if xs:
                ax.plot([100 * x for x in xs], ys, label=f"{meth} (MoE)", **st)
                top = max(top, max(xs))
            xs, ys = _series(rows, meth, "e2e_speedup")
            if xs:
                ax.plot([100 * x for x in xs], ys, ls="--", alpha=0.5, color=st["color"], marker=st["marker"],
                        markerfacecolor="none")
        grid = [k / 100 for k in range(0, int(100 * max(top, 0.4)) + 2)]
        ax.plot([100 * g for g in grid], [1 / (1 - g) for g in grid], color="black", lw=1, label="ideal 1/(1-r)")
        ax.axhline(1.0, color="black", lw=0.5)
        _finish(ax, "measured drop rate (%)", "speedup against no drop",
                f"{m['info']['name']}: solid MoE blocks, dashed end to end", 7)
    fig.tight_layout()
    return _save(fig, out / "speedup_vs_drop.png")


def plot_all(result: Dict, out: pathlib.Path) -> List[pathlib.Path]:
    out = pathlib.Path(out)
    return [plot_accuracy(result, out), plot_layers(result, out), plot_speed(result, out)]

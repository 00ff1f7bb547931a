"""lm-evaluation-harness model type ``dualsparse``: a Hugging Face model,
loaded by lm-eval's ``hf`` model (every ``hf`` model argument works), then
patched by dualsparse under a policy taken from ``--model_args``.

Importing this module registers the type.  lm-eval (0.4.x) loads no model
plugins by itself, so the command line goes through dualsparse::

    python -m dualsparse lm-eval --model_args pretrained=builtin:olmoe,policy=2t,target_drop_rate=0.25,\\
calibration=notes.txt --tasks dualsparse_next_sentence --limit 50

(``--model dualsparse`` and ``--include_path`` of the shipped task are added
when absent; every other lm-eval argument passes through).  Model arguments
besides lm-eval's ``hf`` ones:

* ``pretrained``: a local Hugging Face folder or ``builtin:olmoe`` /
  ``builtin:mixtral``;
* ``policy``: ``nodrop``, ``1t``, ``2t``, ``thresholds`` or ``saved`` (the
  policy saved in the model's config; also the default when the folder has
  one and nothing else is given);
* ``thresholds``: the values, ``/``-separated (``thresholds=0.07/0.09``;
  ``policy=2t`` with one value ``t`` means ``t - 0.01, t + 0.01``);
* ``target_drop_rate`` with ``calibration`` (a text file): thresholds found
  by :func:`dualsparse.find_thresholds` on that text (``policy`` gives the
  kind, default ``2t``; ``per_layer=true``; ``calibration_tokens``, default
  16384; ``calibration_seq_len``, default 256);
* ``reconstruct``: an importance metric (``abs_gate``, ...): profile on the
  calibration text and reorder neurons first; or ``importance``: a saved
  importance file to reconstruct with;
* ``num_threads``: the engine's threads.

The measured drop rate is logged after every request type and, from the
command line, added to the results as ``results["dualsparse"]`` (policy,
overall and per-layer drop rate, tokens).  The counts include every token
lm-eval runs through the model, the padding of its batches included
(``batch_size=1`` runs no padding).
"""
from __future__ import annotations

import logging
from typing import Optional

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

log = logging.getLogger("dualsparse.lm_eval")
_LAST: list = []   # the most recent DualSparseLM (the command line reports its statistics)

_KINDS = ("nodrop", "1t", "2t", "thresholds", "saved")


def _resolve_pretrained(pretrained):
    if isinstance(pretrained, str) and pretrained.startswith("builtin:"):
        from . import builtin

        return str(builtin.path(pretrained.split(":", 1)[1]))
    return pretrained


def _floats(value, name):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    try:
        return [float(v) for v in str(value).split("/") if v.strip()]
    except ValueError:
        raise ValueError(f"dualsparse lm-eval model: {name} must be numbers separated by '/' "
                         f"(e.g. {name}=0.07/0.09); got {value!r}") from None


@register_model("dualsparse")
class DualSparseLM(HFLM):
    """lm-eval's ``hf`` model with the loaded model patched by dualsparse."""

    def __init__(self, pretrained="builtin:olmoe", policy: Optional[str] = None, thresholds=None,
                 target_drop_rate: Optional[float] = None, calibration: Optional[str] = None,
                 calibration_tokens: int = 16384, calibration_seq_len: int = 256, per_layer: bool = False,
                 reconstruct: Optional[str] = None, importance: Optional[str] = None,
                 num_threads: Optional[int] = None, **kwargs):
        import dualsparse as ds

        kind = None if policy is None else str(policy).lower()
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"dualsparse lm-eval model: policy must be one of {', '.join(_KINDS)}; got {policy!r}")
        if target_drop_rate is not None and calibration is None:
            raise ValueError("dualsparse lm-eval model: target_drop_rate needs calibration=<text file> to find "
                             "thresholds on")
        if reconstruct is not None and calibration is None:
            raise ValueError("dualsparse lm-eval model: reconstruct=<metric> needs calibration=<text file> to "
                             "profile on")
        if thresholds is not None and target_drop_rate is not None:
            raise ValueError("dualsparse lm-eval model: give thresholds or target_drop_rate, not both")
        t = None if thresholds is None else _floats(thresholds, "thresholds")
        pretrained = _resolve_pretrained(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        model = self.model
        batches = None
        if calibration is not None:
            batches = ds.text_batches(calibration, self.tokenizer, seq_len=int(calibration_seq_len), batch_size=8,
                                      max_tokens=int(calibration_tokens), device=self.device)
        if importance is not None:
            ds.reconstruct(model, importance, num_threads=num_threads)
        elif reconstruct is not None:
            imp = ds.profile(model, batches, metric=str(reconstruct), num_threads=num_threads, show_progress=False)
            ds.reconstruct(model, imp, num_threads=num_threads)
        pol = None
        if target_drop_rate is not None:
            search_kind = "2t" if kind in (None, "thresholds") else kind
            if search_kind in ("nodrop", "saved"):
                raise ValueError(f"dualsparse lm-eval model: policy={kind} cannot be combined with target_drop_rate")
            pol = ds.find_thresholds(model, batches, float(target_drop_rate), kind=search_kind,
                                     per_layer=bool(per_layer), num_threads=num_threads, show_progress=False)
        elif t is not None:
            k = kind or {1: "1t", 2: "2t"}.get(len(t), "thresholds")
            if k == "1t" and len(t) == 1:
                pol = ds.OneThreshold(t[0])
            elif k == "2t" and len(t) == 1:
                pol = ds.TwoThreshold.around(t[0])
            elif k == "2t" and len(t) == 2:
                pol = ds.TwoThreshold(*t)
            elif k == "thresholds":
                pol = ds.Thresholds(t)
            else:
                raise ValueError(f"dualsparse lm-eval model: policy={k} does not take {len(t)} thresholds ({thresholds!r})")
        elif kind == "nodrop":
            pol = ds.NoDrop()
        elif kind in ("1t", "2t", "thresholds"):
            raise ValueError(f"dualsparse lm-eval model: policy={kind} needs thresholds=... or target_drop_rate=... "
                             "with calibration=<text file>")
        elif kind == "saved":
            from .hf.saved import saved_policy

            if saved_policy(model, fn="lm-eval") is None:
                raise ValueError(f"dualsparse lm-eval model: policy=saved but {pretrained} has no saved DualSparse "
                                 "policy in its config")
        self.handle = ds.patch(model, pol, num_threads=num_threads)   # None: the saved policy, else NoDrop
        log.info("dualsparse: %s", self.handle)
        _LAST[:] = [self]

    # -- statistics
    def drop_report(self) -> dict:
        """Policy and measured drop rates since the model was patched."""
        st = self.handle.stats()
        return {"policy": self.handle.policy.describe(), "policy_dict": _policy_dict(self.handle.policy),
                "drop_rate": st.overall, "per_layer": st.per_layer, "tokens": st.tokens}

    def _report(self, what):
        st = self.handle.stats()
        log.info("dualsparse: after %s requests, measured drop rate %.4f over %d tokens (policy %s)", what,
                 st.overall, st.tokens, self.handle.policy.describe())

    def loglikelihood(self, requests, *args, **kwargs):
        out = super().loglikelihood(requests, *args, **kwargs)
        self._report("loglikelihood")
        return out

    def loglikelihood_rolling(self, requests, *args, **kwargs):
        out = super().loglikelihood_rolling(requests, *args, **kwargs)
        self._report("loglikelihood_rolling")
        return out

    def generate_until(self, requests, *args, **kwargs):
        out = super().generate_until(requests, *args, **kwargs)
        self._report("generate_until")
        return out


def _policy_dict(policy):
    try:
        return policy.to_dict()
    except (TypeError, ValueError):
        return None


def add_report(results) -> Optional[dict]:
    """Adds ``results["dualsparse"]`` (the last DualSparseLM's drop report)."""
    if not _LAST or not isinstance(results, dict):
        return None
    rep = _LAST[0].drop_report()
    results["dualsparse"] = rep
    return rep


def cli(argv) -> int:
    """``python -m dualsparse lm-eval ...``: lm-eval's command line with the
    ``dualsparse`` model type registered and its drop report in the results."""
    import sys

    import lm_eval as run_mod   # lm-eval's run command calls lm_eval.simple_evaluate
    from lm_eval.__main__ import cli_evaluate

    from . import builtin

    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    sub = argv[0] if argv and not argv[0].startswith("-") else None
    if sub in (None, "run"):
        if not any(a == "--model" or a.startswith("--model=") for a in argv):
            argv += ["--model", "dualsparse"]
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            argv += ["--include_path", str(builtin.lm_eval_tasks_dir())]
    had = "simple_evaluate" in vars(run_mod)
    orig = run_mod.simple_evaluate

    def simple_evaluate(*args, **kwargs):
        res = orig(*args, **kwargs)
        rep = add_report(res)
        if rep is not None:
            print(f"dualsparse: policy {rep['policy']}, measured drop rate {rep['drop_rate']:.4f} over "
                  f"{rep['tokens']} tokens (per layer {', '.join(f'{r:.3f}' for r in rep['per_layer'])})")
        return res

    saved_argv = sys.argv
    run_mod.simple_evaluate = simple_evaluate
    sys.argv = ["lm-eval"] + argv
    try:
        cli_evaluate()
    finally:
        if had:
            run_mod.simple_evaluate = orig
        else:
            del run_mod.simple_evaluate
        sys.argv = saved_argv
    return 0

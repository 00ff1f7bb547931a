"""Saved DualSparse models: a ``dualsparse`` section in ``config.json``.

A patched model's ``save_pretrained`` writes its weights as they are (after
:func:`dualsparse.reconstruct`, in importance order; plain transformers loads
and runs them unchanged) and this section in the config::

    "dualsparse": {
      "format_version": 1,
      "dualsparse_version": "0.1.0",
      "policy": {"type": "TwoThreshold", "thresholds": [[0.07, 0.09]]},
      "policy_description": "TwoThreshold(0.07/0.09)",
      "num_partitions": 2,
      "moe_layers": 16,
      "reconstruction": {"metric": "abs_gate", "weighted": false, "calibration_tokens": 65536,
                         "order": "each expert's neurons by descending importance (stable)"}
    }

``reconstruction`` is null for a model whose neurons are in their original
order.  :func:`dualsparse.patch` without a policy on a model loaded from such
a folder applies the saved policy; a section written by a newer format is a
clear error.
"""
from __future__ import annotations

import types
from typing import Optional

from .._version import __version__
from ..policies import Policy, policy_from_dict, policy_to_dict

SECTION = "dualsparse"
FORMAT_VERSION = 1


def read_section(config, fn: str = "patch") -> Optional[dict]:
    """The validated ``dualsparse`` section of a model config, or None."""
    sec = getattr(config, SECTION, None)
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise ValueError(f"dualsparse.{fn}: the model config's '{SECTION}' entry must be a dict (a saved DualSparse "
                         f"model's section); got {type(sec).__name__}")
    ver = sec.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
        raise ValueError(f"dualsparse.{fn}: the model config's '{SECTION}' section has no valid format_version "
                         f"(got {ver!r}); it was not written by dualsparse")
    if ver > FORMAT_VERSION:
        raise ValueError(f"dualsparse.{fn}: this model was saved by dualsparse {sec.get('dualsparse_version', '?')} in "
                         f"format version {ver}, newer than this dualsparse ({__version__}) reads (up to "
                         f"{FORMAT_VERSION}); upgrade dualsparse to use it (plain transformers still loads the weights)")
    return sec


def saved_policy(model, fn: str = "patch") -> Optional[Policy]:
    """The policy saved in the model's config, or None."""
    sec = read_section(getattr(model, "config", None), fn)
    if sec is None or sec.get("policy") is None:
        return None
    try:
        return policy_from_dict(sec["policy"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"dualsparse.{fn}: the policy saved in the model config is invalid: {e}") from None


def _update(model, **entries) -> dict:
    sec = dict(read_section(model.config, "save_pretrained") or {})
    sec.update(entries)
    sec["format_version"] = FORMAT_VERSION
    sec["dualsparse_version"] = __version__
    sec.setdefault("reconstruction", None)
    setattr(model.config, SECTION, sec)
    return sec


def write_policy(handle) -> dict:
    """Puts the handle's current policy into ``model.config.dualsparse``."""
    p = handle.policy
    try:
        pd = policy_to_dict(p)
    except (TypeError, ValueError):
        pd = None   # e.g. a user-defined policy class: described, not restorable
    return _update(handle.model, policy=pd, policy_description=p.describe(), num_partitions=int(p.num_partitions),
                   moe_layers=len(handle.layers))


def note_reconstruction(model, importance, metric: str) -> None:
    """Records in the config that the experts' neurons were reordered."""
    _update(model, reconstruction={"metric": metric, "weighted": bool(importance.weighted),
                                   "calibration_tokens": int(importance.tokens),
                                   "order": "each expert's neurons by descending importance (stable)"})


def _save_pretrained(self, *args, **kwargs):
    """``save_pretrained`` of a patched model: the transformers method, after
    the current policy is written into ``config.dualsparse``."""
    from .patching import get_handle

    h = get_handle(self)
    if h is not None and not h.reverted:
        write_policy(h)
    return type(self).save_pretrained(self, *args, **kwargs)


def attach(handle) -> None:
    """Makes a plain ``model.save_pretrained(path)`` write the section."""
    model = handle.model
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        # a bound method (copy.deepcopy rebinds it to the copy)
        model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)


def detach(handle) -> None:
    model = handle.model
    m = model.__dict__.get("save_pretrained")
    if isinstance(m, types.MethodType) and m.__func__ is _save_pretrained:
        del model.__dict__["save_pretrained"]

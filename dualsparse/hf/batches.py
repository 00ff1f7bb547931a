"""Calibration batches: input_ids tensors or tokenizer outputs."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def iter_batches(model, batches, fn: str) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(input_ids, attention_mask or None) for every batch; raises a clear
    error for empty input, wrong types and batches on another device."""
    if batches is None:
        raise ValueError(f"dualsparse.{fn}: batches is None; pass an iterable of input_ids tensors or tokenizer outputs")
    if isinstance(batches, torch.Tensor) or hasattr(batches, "keys"):
        batches = [batches]
    dev = model_device(model)
    n = 0
    for i, b in enumerate(batches):
        mask = None
        if isinstance(b, torch.Tensor):
            ids = b
        elif hasattr(b, "keys") and "input_ids" in b:
            ids = b["input_ids"]
            mask = b.get("attention_mask") if hasattr(b, "get") else None
        else:
            raise TypeError(f"dualsparse.{fn}: batch {i} must be an input_ids tensor or a tokenizer output with "
                            f"'input_ids'; got {type(b).__name__}")
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"dualsparse.{fn}: batch {i} input_ids must be a (batch, seq) integer tensor; "
                             f"got shape {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError(f"dualsparse.{fn}: batch {i} is empty")
        if ids.device != dev:
            raise ValueError(f"dualsparse.{fn}: batch {i} is on {ids.device} but the model is on {dev}; "
                             "move the batches to the model's device")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != ids.shape:
                raise ValueError(f"dualsparse.{fn}: batch {i} attention_mask has shape {tuple(mask.shape)}, "
                                 f"input_ids {tuple(ids.shape)}")
            if mask.device != dev:
                raise ValueError(f"dualsparse.{fn}: batch {i} attention_mask is on {mask.device} but the model is on {dev}")
        n += 1
        yield ids.long(), mask
    if n == 0:
        raise ValueError(f"dualsparse.{fn}: no calibration batches (the iterable was empty)")


def progress(iterable, desc: str, enabled: bool, total=None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, leave=False)


def collect_batches(model, batches, fn: str):
    """All batches validated up front (nothing runs before every batch is
    known to be usable), as a list."""
    return list(iter_batches(model, batches, fn))

"""Calibration batches from text: strings or text files and a tokenizer in,
``(batch, seq_len)`` token id tensors out, ready for ``profile``,
``find_thresholds``, ``calibrate_dynamic_skip`` and ``routing_scores``."""
from __future__ import annotations

import operator
import os
import pathlib
from typing import List, Optional, Tuple, Union

import torch

_TEXT_SUFFIXES = (".txt", ".txt.gz")


def _positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"dualsparse.text_batches: {name} must be a positive int{' or None' if allow_none else ''}; "
                        f"got {value!r} ({type(value).__name__})") from None
    if value <= 0:
        raise ValueError(f"dualsparse.text_batches: {name} must be a positive int; got {value}")
    return value


def _documents(texts) -> List[Tuple[str, Union[str, pathlib.Path], str]]:
    """``[(what, source, label)]``: ``what`` is ``"text"`` or ``"file"``,
    ``label`` names the item in messages."""
    if isinstance(texts, (str, os.PathLike)):
        items = [texts]
    elif isinstance(texts, (bytes, bytearray)):
        raise TypeError("dualsparse.text_batches: texts must be str (text or a path), a pathlib.Path or a list of "
                        "them; got bytes (decode it first)")
    else:
        try:
            items = list(texts)
        except TypeError:
            raise TypeError("dualsparse.text_batches: texts must be str (text or a path), a pathlib.Path or a list "
                            f"of them; got {type(texts).__name__}") from None
        if not items:
            raise ValueError("dualsparse.text_batches: texts is an empty list")
    docs = []
    for i, item in enumerate(items):
        where = "texts" if isinstance(texts, (str, os.PathLike)) else f"texts[{i}]"
        if isinstance(item, os.PathLike):
            p = pathlib.Path(os.fspath(item))
            if not p.is_file():
                raise FileNotFoundError(f"dualsparse.text_batches: {where} is a path, but no such file: {str(p)!r}")
            docs.append(("file", p, f"{where} (file {str(p)!r})"))
        elif isinstance(item, str):
            if "\n" not in item and os.path.isfile(item):
                docs.append(("file", pathlib.Path(item), f"{where} (file {item!r})"))
            elif "\n" not in item and item.strip().lower().endswith(_TEXT_SUFFIXES):
                raise FileNotFoundError(
                    f"dualsparse.text_batches: {where} = {item!r} looks like a text file name but no such file "
                    f"exists (a one-line str ending in .txt or .txt.gz is read as a file when it exists; pass "
                    "pathlib.Path for a path, or the text itself)")
            else:
                docs.append(("text", item, where))
        else:
            raise TypeError(f"dualsparse.text_batches: {where} must be str (text or a path) or a pathlib.Path; "
                            f"got {type(item).__name__}")
    return docs


def _encode(tokenizer, text: str) -> List[int]:
    out = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = out["input_ids"] if hasattr(out, "keys") else getattr(out, "input_ids", out)
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return list(ids)


def _tokens(tokenizer, text: str, limit: Optional[int]) -> List[int]:
    """Token ids of ``text``; with ``limit``, at least its first ``limit``
    ids (the whole text when shorter), tokenizing only a prefix of a long
    text cut at a line break."""
    if limit is None:
        return _encode(tokenizer, text)
    n_chars = max(4096, 8 * limit)
    while n_chars < len(text):
        cut = text.rfind("\n", 0, n_chars)
        cut = n_chars if cut <= 0 else cut
        # the last tokens of a cut prefix can differ from those of the whole
        # text; keep a margin beyond ``limit`` and drop the rest
        ids = _encode(tokenizer, text[:cut])
        if len(ids) >= limit + 64:
            return ids[:limit]
        n_chars *= 4
    return _encode(tokenizer, text)


def text_batches(texts, tokenizer, *, seq_len: int = 256, batch_size: int = 8, max_tokens: Optional[int] = None,
                 drop_last: bool = False, device=None) -> List[torch.Tensor]:
    """Token batches of text for calibration and evaluation.

    ``texts``: a str of text, a path (``pathlib.Path``, or a one-line str
    naming an existing file; UTF-8, ``.gz`` decompressed), or a list of
    these (one document each).  A one-line str ending in ``.txt`` or
    ``.txt.gz`` that names no existing file raises ``FileNotFoundError``
    rather than being taken for text.

    The documents are tokenized without special tokens and concatenated,
    with the tokenizer's EOS token id between documents when it has one,
    and the token stream is cut into consecutive, non-overlapping windows of
    ``seq_len`` tokens (the tokens after the last full window are left
    out).  ``max_tokens`` caps the tokens used (``max_tokens // seq_len``
    windows; long texts are then only partly tokenized).  Windows are
    grouped into batches of ``batch_size``; the last batch is smaller unless
    ``drop_last``.

    Returns a list of int64 tensors of shape ``(b, seq_len)``, ``b <=
    batch_size``, on ``device`` (default CPU), ready for ``ds.profile``,
    ``ds.find_thresholds``, ``ds.calibrate_dynamic_skip`` and
    ``ds.routing_scores``::

        batches = ds.text_batches("notes.txt", tok, seq_len=128, max_tokens=8192)
    """
    seq_len = _positive_int(seq_len, "seq_len")
    batch_size = _positive_int(batch_size, "batch_size")
    max_tokens = _positive_int(max_tokens, "max_tokens", allow_none=True)
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"dualsparse.text_batches: max_tokens={max_tokens} is less than one window of "
                         f"seq_len={seq_len} tokens")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError("dualsparse.text_batches: tokenizer must be a Hugging Face tokenizer (callable, returning "
                        f"'input_ids'); got {type(tokenizer).__name__}")
    docs = _documents(texts)
    from ..text import read_text

    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, int) and not isinstance(eos, bool) else None
    limit = None if max_tokens is None else (max_tokens // seq_len) * seq_len
    ids: List[int] = []
    for what, src, label in docs:
        if limit is not None and len(ids) >= limit:
            break
        text = read_text(src) if what == "file" else src
        if not text.strip():
            raise ValueError(f"dualsparse.text_batches: {label} is empty (no text to tokenize)")
        if ids and eos is not None:
            ids.append(eos)
        try:
            doc_ids = _tokens(tokenizer, text, None if limit is None else limit - len(ids))
        except (KeyError, TypeError, AttributeError) as e:
            raise TypeError("dualsparse.text_batches: tokenizer must be a Hugging Face tokenizer returning "
                            f"'input_ids' when called on a str; calling it failed: {e!r}") from None
        if not doc_ids:
            raise ValueError(f"dualsparse.text_batches: {label} gave no tokens")
        ids.extend(doc_ids)
    n_windows = len(ids) // seq_len
    if limit is not None:
        n_windows = min(n_windows, limit // seq_len)
    if n_windows == 0:
        raise ValueError(f"dualsparse.text_batches: the text has {len(ids)} tokens, less than one window of "
                         f"seq_len={seq_len}; give more text or a smaller seq_len")
    flat = torch.as_tensor(ids[: n_windows * seq_len], dtype=torch.long).reshape(n_windows, seq_len)
    if device is not None:
        flat = flat.to(device)
    batches = list(torch.split(flat, batch_size))
    if drop_last and batches[-1].shape[0] < batch_size:
        batches.pop()
        if not batches:
            raise ValueError(f"dualsparse.text_batches: the text gives {n_windows} windows of seq_len={seq_len}, "
                             f"less than one full batch of batch_size={batch_size} (drop_last=True)")
    return [b.contiguous() for b in batches]

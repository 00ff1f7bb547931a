"""Plain-text handling shared by the sweep and the built-in models' training
script: reading (optionally gzip-compressed) UTF-8 files, paragraphs,
sentences, and the next-sentence multiple-choice task.

Nothing here needs torch; tokenisation is the caller's."""
from __future__ import annotations

import gzip
import os
import re
from typing import Dict, List, Sequence

import numpy as np

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_WS = re.compile(r"[ \t\r\f\v]+")


def read_text(path) -> str:
    """The text of a UTF-8 file; ``.gz`` files are decompressed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path!r}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None


def paragraphs(text: str) -> List[str]:
    """Blocks separated by blank lines, each with its hard-wrapped lines
    joined by single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        p = _WS.sub(" ", " ".join(line.strip() for line in block.splitlines())).strip()
        if p:
            out.append(p)
    return out


def sentences(paragraph: str) -> List[str]:
    """A paragraph split after ``.``, ``!`` or ``?`` (and closing quotes)
    before a capital letter or digit.  A heuristic: abbreviations such as
    "Mr. Elton" split too, which the multiple-choice task tolerates."""
    return [s.strip() for s in _SENT_END.split(paragraph) if s.strip()]


def mc_items(paras: Sequence[str], n_items: int, *, n_choices: int = 4, context_sentences: int = 2,
             min_chars: int = 30, max_chars: int = 300, seed: int = 0) -> List[Dict]:
    """Next-sentence multiple choice: for a run of ``context_sentences``
    sentences, pick the sentence that really follows among ``n_choices``
    (the others are sentences of similar length drawn from elsewhere in the
    text).  Returns dicts with ``context``, ``choices`` and ``label``;
    deterministic from ``seed``."""
    if n_choices < 2:
        raise ValueError(f"mc_items: n_choices must be >= 2; got {n_choices}")
    sents: List[List[str]] = [sentences(p) for p in paras]
    pool = [(i, j) for i, ss in enumerate(sents) for j, s in enumerate(ss) if min_chars <= len(s) <= max_chars]
    cands = [(i, j) for (i, j) in pool if j >= context_sentences]
    if len(cands) < 1 or len(pool) < n_choices:
        return []
    rng = np.random.default_rng(seed)
    lengths = np.array([len(sents[i][j]) for i, j in pool])
    order = np.argsort(lengths, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    pool_index = {p: k for k, p in enumerate(pool)}
    picks = rng.choice(len(cands), size=min(n_items, len(cands)), replace=False)
    items = []
    for c in sorted(picks.tolist()):
        i, j = cands[c]
        true = sents[i][j]
        # distractors: sentences of similar length (nearest ranks), not from this paragraph
        r = rank[pool_index[(i, j)]]
        window = order[max(0, r - 40): r + 41]
        window = [k for k in window.tolist() if pool[k][0] != i and sents[pool[k][0]][pool[k][1]] != true]
        if len(window) < n_choices - 1:
            continue
        chosen = rng.choice(len(window), size=n_choices - 1, replace=False)
        distract = [sents[pool[window[k]][0]][pool[window[k]][1]] for k in chosen.tolist()]
        label = int(rng.integers(n_choices))
        choices = distract[:label] + [true] + distract[label:]
        items.append({"context": " ".join(sents[i][j - context_sentences: j]), "choices": choices,
                      "label": label})
    return items

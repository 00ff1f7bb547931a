"""The built-in MoE language models, shipped inside the package.

Two small models trained by ``scripts/train_builtin.py`` on public-domain
English text (Jane Austen's novels, the Brown corpus, State of the Union
addresses), with a byte-level BPE tokenizer trained on the same text:

* ``mixtral``: ``MixtralForCausalLM``, 4 layers, 8 experts, top-2, the top-2
  weights renormalised to sum to 1;
* ``olmoe``: ``OlmoeForCausalLM``, 4 layers, 32 small experts, top-4, raw
  softmax probabilities.

and one made from real pretrained weights, converted on first use (it needs
the optional extra, see :mod:`dualsparse.builtin.converted`):

* ``smollm2-moe``: ``Qwen2MoeForCausalLM``, SmolLM2-135M's 30 FFNs split into
  a shared expert and routed experts with trained routers
  (:mod:`dualsparse.moefication`).

Each folder holds a standard Hugging Face checkpoint (bfloat16 weights,
config, tokenizer) and ``TRAINING.json`` (settings, wall time, loss curve,
held-out perplexity, router statistics).  ``heldout.txt.gz`` is text the
models never saw, the sweep's default data.

    model, tok = dualsparse.builtin.load("olmoe")
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Dict, List

_HERE = pathlib.Path(__file__).resolve().parent
MODELS_DIR = _HERE / "models"
#: the models shipped in the package
NAMES = ("mixtral", "olmoe")
#: the models converted on first use from weights that an optional extra brings
CONVERTED = ("smollm2-moe",)
ALL_NAMES = NAMES + CONVERTED


def names() -> List[str]:
    """The built-in model names (shipped, then converted on first use)."""
    return list(ALL_NAMES)


def path(name: str, show_progress: bool = True) -> pathlib.Path:
    """The folder of a built-in model (a Hugging Face checkpoint); for a
    converted model, its cache folder, converted first if needed."""
    if name in CONVERTED:
        from .converted import ensure

        return ensure(name, show_progress=show_progress)
    if name not in NAMES:
        raise ValueError(f"dualsparse.builtin: unknown built-in model {name!r}; the built-in models are "
                         f"{', '.join(ALL_NAMES)}")
    p = MODELS_DIR / name
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"dualsparse.builtin: the files of built-in model {name!r} are missing from {p} "
                                "(a source checkout without them: run scripts/train_builtin.py)")
    return p


def heldout_path() -> pathlib.Path:
    """Held-out text (never trained on) packaged for evaluation."""
    return _HERE / "heldout.txt.gz"


def lm_eval_tasks_dir() -> pathlib.Path:
    """Folder of the lm-evaluation-harness task ``dualsparse_next_sentence``
    (next-sentence multiple choice on the packaged held-out text): pass it
    as ``TaskManager(include_path=...)`` or ``lm_eval --include_path``."""
    return _HERE.parent / "lm_eval_tasks"


def training_info(name: str) -> Dict:
    """The contents of the model's TRAINING.json (for ``smollm2-moe``: how its
    plan was made and measured)."""
    if name in CONVERTED:
        from .converted import training_info as info

        return info()
    return json.loads((path(name) / "TRAINING.json").read_text())


def _dtype_kw(dtype):
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: dtype}


def load_model(name_or_path, dtype=None):
    """(model, tokenizer) for a built-in name or a local Hugging Face model
    folder, loaded offline, in eval mode.  ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dualsparse.builtin.load_model: dtype must be a torch dtype name such as 'float32' or "
                             f"'bfloat16'; got {dtype!r}")
        dtype = getattr(torch, dtype)
    if isinstance(name_or_path, str) and name_or_path in ALL_NAMES:
        p = path(name_or_path)
    else:
        p = pathlib.Path(os.fspath(name_or_path))
        if not p.is_dir():
            raise FileNotFoundError(f"dualsparse: model {str(name_or_path)!r} is neither a built-in model "
                                    f"({', '.join(ALL_NAMES)}) nor a local folder")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"dualsparse: {p} has no config.json (not a Hugging Face model folder)")
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, **_dtype_kw(dtype))
    model.eval()
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tok


def load(name: str = "olmoe", dtype=None):
    """(model, tokenizer) of a built-in model (float32 by default)."""
    path(name)
    return load_model(name, dtype)

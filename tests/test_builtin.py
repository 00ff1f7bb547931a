"""The built-in models shipped in the package: size, offline loading with
both transformers generations, that they learned the text, that their
routers are skewed, and that the training script is deterministic."""
import collections
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hang import HANG_S

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dualsparse import builtin  # noqa: E402
from dualsparse.text import paragraphs, read_text  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def test_shipped_files_fit_in_20_mb():
    from dualsparse.builtin import converted

    files = [f for n in builtin.NAMES for f in builtin.path(n).iterdir()] + [builtin.heldout_path(),
                                                                          converted.PLAN_PATH, converted.INFO_PATH]
    total = sum(f.stat().st_size for f in files)
    assert total <= 20_000_000, f"{total / 1e6:.2f} MB"
    for n in builtin.NAMES:
        names = {f.name for f in builtin.path(n).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "TRAINING.json"} <= names


@pytest.mark.parametrize("name", builtin.NAMES)
def test_loads_offline_with_the_documented_routing(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = builtin.load(name)
    cfg = model.config
    assert next(model.parameters()).dtype == torch.float32
    if name == "mixtral":
        assert cfg.model_type == "mixtral" and cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    else:
        assert cfg.model_type == "olmoe" and cfg.num_experts >= 32 and cfg.norm_topk_prob is False
    text = "It is a truth universally acknowledged, that the Congress shall assemble."
    assert tok.decode(tok(text)["input_ids"]) == text
    bf16, _ = builtin.load(name, dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_bad_names_and_dtypes():
    with pytest.raises(ValueError, match="unknown built-in model 'gpt5'"):
        builtin.load("gpt5")
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        builtin.load_model("/no/such/folder")
    with pytest.raises(ValueError, match="dtype"):
        builtin.load_model("olmoe", dtype="float33")


def _windows(tok, n=12, seq=256):
    paras = paragraphs(read_text(builtin.heldout_path()))
    ids = []
    for p in paras:
        ids.extend(tok(p, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    ids = np.asarray(ids)
    step = len(ids) // n
    return ids, [ids[i * step: i * step + seq + 1] for i in range(n)]


@pytest.mark.parametrize("name", builtin.NAMES)
def test_learned_the_text(name):
    """Held-out perplexity (float64 log-softmax) far below the perplexity of
    a unigram model fitted to the held-out text itself."""
    model, tok = builtin.load(name)
    ids, windows = _windows(tok)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=torch.as_tensor(w[None, :-1])).logits[0].double().numpy()
            m = logits.max(-1, keepdims=True)
            lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
            nll += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
    ppl = math.exp(nll / n)
    counts = collections.Counter(ids.tolist())
    p = np.array([counts[t] for t in ids.tolist()], dtype=np.float64) / len(ids)
    unigram = math.exp(-np.log(p).mean())
    assert ppl < 0.3 * unigram, (ppl, unigram)


@pytest.mark.parametrize("name", builtin.NAMES)
def test_router_scores_are_skewed(name):
    """The top-K-normalised scores the thresholds act on: the top-1 share
    is well above uniform, and a sizeable fraction of the lowest-ranked
    selected experts carry little weight."""
    model, tok = builtin.load(name)
    _, windows = _windows(tok, n=6)
    x = torch.as_tensor(np.stack([w[:-1] for w in windows]))
    with torch.no_grad():
        out = model(input_ids=x, output_router_logits=True)
    K = model.config.num_experts_per_tok
    for logits in out.router_logits:
        p = torch.softmax(logits.double(), -1)
        top = torch.topk(p, K, -1).values
        s = top / top.sum(-1, keepdim=True)
        assert float(s[:, 0].mean()) > 1.0 / K + 0.1
        assert float((s[:, -1] < 0.6 / K).double().mean()) > 0.2


@pytest.mark.parametrize("name", builtin.NAMES)
def test_training_record(name):
    info = builtin.training_info(name)
    t = info["training"]
    assert t["steps"] > 0 and t["seed"] is not None and t["wall_seconds"] > 0
    assert info["final_train_lm_loss_ema"] < info["loss_curve"][0]["lm_loss"] - 2.0
    assert info["architecture"] == {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}[name]
    assert set(info["heldout_ppl_stored_bf16"]) == {"austen", "brown", "sotu"}


@pytest.mark.skipif(not DATA.is_dir(), reason=f"the corpora folder {DATA} is missing")
def test_training_script_is_deterministic(tmp_path):
    if transformers.__version__.startswith("4."):
        pytest.skip("the training script runs with the newest transformers")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, str(ROOT / "scripts" / "train_builtin.py"), "--out", str(out), "--model", "olmoe",
               "--steps", "3", "--warmup", "2", "--limit-chars", "200000", "--vocab-size", "600", "--threads", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    a, b = (o / "models" / "olmoe" for o in outs)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (outs[0] / "tokenizer" / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer" / "tokenizer.json").read_bytes()
    assert (outs[0] / "heldout.txt.gz").read_bytes() == (outs[1] / "heldout.txt.gz").read_bytes()
    ja, jb = (json.loads((d / "TRAINING.json").read_text()) for d in (a, b))
    assert [c["lm_loss"] for c in ja["loss_curve"]] == [c["lm_loss"] for c in jb["loss_curve"]]

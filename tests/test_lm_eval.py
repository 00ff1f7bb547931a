"""A patched model inside lm-evaluation-harness: HFLM around the patched
built-in model, on the task shipped with the package
(``dualsparse_next_sentence``, built from packaged held-out text, no
download).  The log-likelihoods lm-eval reports are checked against each
choice scored alone in float64."""
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin  # noqa: E402

TASK = "dualsparse_next_sentence"
LIMIT = 24


def _evaluate(model, tok, limit=LIMIT):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    tm = TaskManager(include_path=str(builtin.lm_eval_tasks_dir()))
    return simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=limit, log_samples=True,
                           bootstrap_iters=0)


def _loglik(model, tok, context, continuation):
    """log p(continuation | context), one sequence, float64 log-softmax."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(lp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


def _check(res, model, tok, tol):
    samples = res["samples"][TASK]
    assert len(samples) == LIMIT
    right = 0
    for s in samples:
        got = [r[0][0] for r in s["resps"]]
        want = [_loglik(model, tok, *a) for a in s["arguments"]]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        right += int(np.argmax(got) == s["doc"]["label"])
    assert res["results"][TASK]["acc,none"] == pytest.approx(right / LIMIT)


def test_task_is_shipped_and_loads():
    from dualsparse.lm_eval_tasks import docs  # noqa: F401  (importable, as lm-eval's !function needs)

    d = docs.load(n_items=10)
    assert len(d["test"]) == 10
    row = d["test"][0]
    assert len(row["choices"]) == 4 and 0 <= row["label"] < 4 and row["context"]


def test_hflm_on_patched_model_no_drop_matches_unpatched():
    model, tok = builtin.load("olmoe")
    ref_model, _ = builtin.load("olmoe")
    h = ds.patch(model)
    res = _evaluate(model, tok)
    assert ds.drop_stats(model).tokens > 0          # the patched layers did run
    h.revert()
    _check(res, ref_model, tok, tol=2e-3)


def test_hflm_with_dropping():
    model, tok = builtin.load("olmoe")
    ds.patch(model, ds.TwoThreshold(0.14, 0.16))
    res = _evaluate(model, tok)
    st = ds.drop_stats(model)
    assert st.overall > 0.05 and math.isfinite(res["results"][TASK]["acc_norm,none"])
    # lm-eval's padded batches give each choice the log-likelihood it has alone
    _check(res, model, tok, tol=2e-3)


# ------------------------------------------------ the command line (python -m dualsparse lm-eval)

def _cli(tmp_path, model_args, limit=LIMIT, batch_size=8):
    import glob
    import json
    import subprocess
    import sys

    out_dir = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(ds.__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dualsparse", "lm-eval", "--model_args", model_args, "--tasks", TASK,
           "--limit", str(limit), "--batch_size", str(batch_size), "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1, files
    res = json.loads(open(files[0]).read())
    assert "dualsparse: policy" in proc.stdout and "measured drop rate" in proc.stdout
    return res


def test_cli_thresholds_match_the_python_route(tmp_path):
    res = _cli(tmp_path, "pretrained=builtin:olmoe,thresholds=0.14/0.16,dtype=float32", limit=8)
    rep = res["dualsparse"]
    assert rep["policy_dict"] == {"type": "TwoThreshold", "thresholds": [[0.14, 0.16]]}
    # the same evaluation through HFLM around a model patched in Python
    model, tok = builtin.load("olmoe")
    ds.patch(model, ds.TwoThreshold(0.14, 0.16))
    want = _evaluate(model, tok, limit=8)
    st = ds.drop_stats(model)
    assert rep["drop_rate"] == pytest.approx(st.overall, abs=1e-9) and rep["tokens"] == st.tokens
    assert rep["per_layer"] == pytest.approx(st.per_layer, abs=1e-9)
    for m in ("acc,none", "acc_norm,none"):
        assert res["results"][TASK][m] == pytest.approx(want["results"][TASK][m])


def test_cli_target_drop_rate_on_a_text_file_and_saved_policy(tmp_path):
    from dualsparse.text import read_text

    calib = tmp_path / "calib.txt"
    calib.write_text(read_text(builtin.heldout_path())[:60000])
    res = _cli(tmp_path, f"pretrained=builtin:mixtral,policy=1t,target_drop_rate=0.25,calibration={calib},"
                         "calibration_tokens=2048,calibration_seq_len=128,dtype=float32", limit=8)
    rep = res["dualsparse"]
    assert rep["policy_dict"]["type"] == "OneThreshold" and 0.1 < rep["drop_rate"] < 0.45
    # a saved DualSparse folder: its policy applies without model_args
    model, _ = builtin.load("olmoe")
    ds.patch(model, ds.OneThreshold(0.2))
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin.path("olmoe") / f, folder / f)
    # (in this process: the command line's argument passing is what the runs above check)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dualsparse.lm_eval_model import DualSparseLM

    lm = DualSparseLM(pretrained=str(folder), dtype="float32", batch_size=8, device="cpu")
    tm = TaskManager(include_path=str(builtin.lm_eval_tasks_dir()))
    simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=4, bootstrap_iters=0)
    rep = lm.drop_report()
    assert rep["policy_dict"] == {"type": "OneThreshold", "thresholds": [[0.2]]}
    assert rep["drop_rate"] > 0.05 and rep["tokens"] > 0


def test_model_args_errors_are_clear():
    from dualsparse.lm_eval_model import DualSparseLM

    with pytest.raises(ValueError, match="policy must be one of"):
        DualSparseLM(pretrained="builtin:olmoe", policy="3t")
    with pytest.raises(ValueError, match="target_drop_rate needs calibration"):
        DualSparseLM(pretrained="builtin:olmoe", target_drop_rate=0.2)
    with pytest.raises(ValueError, match="unknown built-in model 'nope'"):
        DualSparseLM(pretrained="builtin:nope")
    with pytest.raises(ValueError, match="thresholds must be numbers separated by '/'"):
        DualSparseLM(pretrained="builtin:olmoe", thresholds="0.1;0.2", dtype="float32")

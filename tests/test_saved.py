"""Saved DualSparse models: ``save_pretrained`` of a patched, reconstructed
model writes its weights in importance order plus a ``dualsparse`` section in
config.json; ``ds.patch`` on the reloaded model applies the saved policy
(same outputs, same drop rate); plain transformers loads and runs the folder
like the original model.  Run under transformers 5.x and 4.57."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin  # noqa: E402
from dualsparse.hf import saved  # noqa: E402
from dualsparse.text import read_text  # noqa: E402


def _calibration(tok, n=4, seq=64):
    text = read_text(builtin.heldout_path())[:20000]
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    return [ids[i * seq:(i + 1) * seq][None] for i in range(n)]


def _eval_ids(tok):
    text = read_text(builtin.heldout_path())[30000:34000]
    return tok(text, return_tensors="pt")["input_ids"][:, :96]


def _load(path):
    """Plain transformers, as a colleague without dualsparse would load it."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("name", ["olmoe", "mixtral"])
def test_round_trip_reconstructed_with_policy(name, tmp_path):
    model, tok = builtin.load(name)
    ref_model, _ = builtin.load(name)
    x = _eval_ids(tok)
    imp = ds.profile(model, _calibration(tok), metric="abs_gate_up", show_progress=False)
    ds.reconstruct(model, imp)
    policy = ds.TwoThreshold([0.10, 0.12, 0.14, 0.16], [0.14, 0.16, 0.18, 0.2]) if name == "olmoe" \
        else ds.OneThreshold(0.3)
    ds.patch(model, policy)
    with torch.no_grad():
        out = model(input_ids=x).logits
    st = ds.drop_stats(model)
    assert st.overall > 0.05
    model.save_pretrained(tmp_path)          # a plain transformers call

    sec = json.loads((tmp_path / "config.json").read_text())["dualsparse"]
    assert sec["format_version"] == saved.FORMAT_VERSION and sec["dualsparse_version"] == ds.__version__
    assert ds.Policy.from_dict(sec["policy"]) == policy
    assert sec["num_partitions"] == policy.num_partitions and sec["moe_layers"] == 4
    assert sec["reconstruction"]["metric"] == "abs_gate_up" and sec["reconstruction"]["calibration_tokens"] == 256

    # plain transformers: loads, runs, and is the original model (reconstruction changes no output)
    plain = _load(tmp_path)
    assert not hasattr(plain, "_dualsparse_handle")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, ref_model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    # the neurons really are in another order than the original checkpoint's
    moved = [not torch.equal(a, b) for (n, a), (_, b) in zip(plain.state_dict().items(), ref_model.state_dict().items())
             if "experts" in n]
    assert moved and any(moved)

    # ds.patch without a policy applies the saved one: same outputs, same drop rate
    again = _load(tmp_path)
    h = ds.patch(again)
    assert h.policy == policy
    with torch.no_grad():
        out2 = again(input_ids=x).logits
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    st2 = ds.drop_stats(again)
    assert st2.per_layer == pytest.approx(st.per_layer, abs=1e-12) and st2.overall == pytest.approx(st.overall)
    # an explicit policy wins over the saved one
    h.revert()
    assert ds.patch(again, ds.NoDrop()).policy == ds.NoDrop()


def test_save_writes_the_current_policy_and_revert_stops_the_hook(tmp_path):
    model, tok = builtin.load("olmoe")
    h = ds.patch(model)
    ds.set_policy(model, ds.OneThreshold(0.2))
    model.save_pretrained(tmp_path / "a")
    sec = json.loads((tmp_path / "a" / "config.json").read_text())["dualsparse"]
    assert sec["policy"] == {"type": "OneThreshold", "thresholds": [[0.2]]} and sec["reconstruction"] is None
    ds.set_policy(model, ds.Thresholds([0.05, 0.1, 0.2]))
    model.save_pretrained(tmp_path / "b")
    sec = json.loads((tmp_path / "b" / "config.json").read_text())["dualsparse"]
    assert ds.Policy.from_dict(sec["policy"]) == ds.Thresholds([0.05, 0.1, 0.2]) and sec["num_partitions"] == 3
    h.revert()
    assert "save_pretrained" not in model.__dict__
    # profiling inside a patched model (temporary NoDrop) does not change what is saved
    h = ds.patch(model, ds.OneThreshold(0.25))
    ds.profile(model, _calibration(tok, n=1), show_progress=False)
    model.save_pretrained(tmp_path / "c")
    sec = json.loads((tmp_path / "c" / "config.json").read_text())["dualsparse"]
    assert sec["policy"] == {"type": "OneThreshold", "thresholds": [[0.25]]}


def test_newer_or_broken_section_is_a_clear_error():
    model, _ = builtin.load("olmoe")
    model.config.dualsparse = {"format_version": saved.FORMAT_VERSION + 1, "dualsparse_version": "9.0",
                               "policy": {"type": "OneThreshold", "thresholds": [[0.1]]}}
    with pytest.raises(ValueError, match="format version 2, newer.*upgrade dualsparse"):
        ds.patch(model)
    with pytest.raises(ValueError, match="newer"):
        ds.patch(model, ds.NoDrop())
    assert not hasattr(model, "_dualsparse_handle")
    model.config.dualsparse = {"format_version": 1, "policy": {"type": "Nonsense"}}
    with pytest.raises(ValueError, match="policy saved in the model config is invalid.*unknown policy type 'Nonsense'"):
        ds.patch(model)
    model.config.dualsparse = {"policy": None}
    with pytest.raises(ValueError, match="no valid format_version"):
        ds.patch(model)
    model.config.dualsparse = {"format_version": 1, "policy": {"type": "OneThreshold", "thresholds": [[0.1]] * 3}}
    with pytest.raises(ValueError, match="3 layers but the model has 4"):
        ds.patch(model)


@pytest.mark.parametrize("policy", [ds.NoDrop(), ds.OneThreshold(0.1), ds.OneThreshold([0.1, 0.2]),
                                    ds.TwoThreshold(0.1, 0.3), ds.TwoThreshold([0.1, 0.2], [0.3, 0.4]),
                                    ds.Thresholds([0.1, 0.2, 0.3], normalize=False),
                                    ds.Thresholds([[0.1, 0.2], [0.15, 0.25]]),
                                    ds.LoadAware(ds.OneThreshold(0.2), rule="fill", steps=64),
                                    ds.LoadAware(ds.TwoThreshold(0.1, 0.3))])
def test_policy_dict_round_trip(policy):
    d = json.loads(json.dumps(policy.to_dict()))
    q = ds.Policy.from_dict(d)
    assert type(q) is type(policy) and q == policy
    assert q.num_partitions == policy.num_partitions


def test_policy_dict_round_trip_others():
    for p in (ds.RandomDrop(0.3, seed=5), ds.TopKReduce(2), ds.DynamicSkip([[0.1, 0.2], [0.3, 0.4]])):
        q = ds.Policy.from_dict(json.loads(json.dumps(p.to_dict())))
        assert type(q) is type(p) and q.to_dict() == p.to_dict()
    assert ds.Policy.from_dict(ds.RandomDrop(0.3, seed=5).to_dict()).seed == 5
    np.testing.assert_array_equal(ds.Policy.from_dict(ds.DynamicSkip([0.1, 0.2]).to_dict()).betas, [[0.1], [0.2]])
    with pytest.raises(ValueError, match="not calibrated"):
        ds.DynamicSkip().to_dict()
    with pytest.raises(ValueError, match="TwoThreshold policy needs 'thresholds'"):
        ds.Policy.from_dict({"type": "TwoThreshold"})
    with pytest.raises(TypeError, match="expected a dict"):
        ds.Policy.from_dict("OneThreshold")


from hf_models import FAMILIES, build, input_ids  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips(family, tmp_path):
    model = build(family)
    ids = input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ds.patch(model, ds.TwoThreshold(0.2, 0.45))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    st = ds.drop_stats(model)
    model.save_pretrained(tmp_path)
    plain = _load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    h = ds.patch(plain)
    assert h.policy == ds.TwoThreshold(0.2, 0.45)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)
    assert ds.drop_stats(plain).per_layer == pytest.approx(st.per_layer, abs=1e-12)

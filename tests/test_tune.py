"""tune_policy: on a tiny model of every supported family the chosen policy
reaches the target on the calibration rows, the model is left reconstructed
by the chosen metric (compared with ds.reconstruct on a fresh copy) and
patched with the chosen policy, outputs without dropping equal the unpatched
model's, and the reported losses equal float64 cross entropies of the
held-out rows; bad input leaves the model untouched."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse.hf import tune as tune_mod  # noqa: E402
from dualsparse.hf.patching import get_handle  # noqa: E402
from hf_models import FAMILIES, build  # noqa: E402

ROWS, SEQ = 16, 24
GRID = dict(metrics=("abs_gate", "abs_gate_up"), bands=(0.02,), partitions=(2, 3, 4), per_layer=(False, True))
# PhiMoE's sparsemixer with its default mask width gives the tiny model normalised scores of exactly 0.5
# (see test_hf.py); a wide mask gives continuous scores
CONTINUOUS = {"phimoe": dict(router_jitter_noise=1.0)}


def _batches(seed=3, rows=ROWS, seq=SEQ, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    return [ids[: rows // 2], ids[rows // 2:]], ids


def _held_rows(n, holdout):
    """The documented split: row floor((k + 1/2) n / n_hold) for k < n_hold."""
    n_hold = int(round(holdout * n))
    return sorted({int(math.floor((k + 0.5) * n / n_hold)) for k in range(n_hold)})


def _ce64(model, ids):
    """Mean next-token cross entropy in float64 (per token, all rows)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return float(-lp.mean())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_tune_policy_every_family(family):
    kw = CONTINUOUS.get(family, {})
    model = build(family, **kw)
    fresh = build(family, **kw)
    batches, ids = _batches()
    with torch.no_grad():
        want_logits = fresh(input_ids=ids, use_cache=False).logits.double()
    res = ds.tune_policy(model, batches, 0.3, show_progress=False, **GRID)

    # every grid point is listed; P=3 (not dividing I=32) is skipped with the reason
    assert len(res.candidates) == 2 * 1 * 3 * 2
    skipped = [c for c in res.candidates if c.skipped]
    assert {c.num_partitions for c in skipped} == {3}
    assert all("do not divide" in c.skipped for c in skipped)
    run = [c for c in res.candidates if not c.skipped]
    assert all(c.loss is not None and math.isfinite(c.loss) for c in run)
    # the chosen candidate: within tolerance, lowest calibration loss of those that are
    ok = [c for c in run if c.within_tolerance]
    assert ok and res.chosen in ok
    assert res.loss == min(c.loss for c in ok)
    assert abs(res.drop_rate - 0.3) <= res.tolerance
    c = res.chosen
    assert (c.metric, c.num_partitions, c.per_layer, c.band) == (res.metric, res.num_partitions, res.per_layer,
                                                                 res.band)
    assert res.policy.num_partitions == res.num_partitions
    # the thresholds spread the band around T (P=2: T -+ b; P=4: T - 1.5b ... T + 1.5b)
    table = np.asarray(res.policy.table)
    steps = np.diff(table, axis=1)
    np.testing.assert_allclose(steps, 2 * res.band if res.num_partitions == 2 else res.band, atol=1e-12)
    np.testing.assert_allclose(np.diff(c.thresholds), steps[0], atol=1e-12)

    # patched with the chosen policy
    h = get_handle(model)
    assert h is not None and not h.reverted and h.policy is res.policy

    # reconstructed exactly once by the chosen metric: the weights equal a
    # fresh copy reconstructed by ds.reconstruct with the profiled importance
    ref = build(family, **kw)
    ds.reconstruct(ref, res.importance, res.metric)
    get_handle(ref) is None or get_handle(ref).revert()
    h.revert()
    assert _same_state(_state(model), _state(ref))

    # NoDrop outputs unchanged by the reconstruction (against the unpatched original)
    ds.patch(model, ds.NoDrop())
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits.double()
    assert torch.allclose(got, want_logits, rtol=1e-4, atol=1e-4)
    get_handle(model).revert()

    # the reported losses are the held-out rows' cross entropies (float64 reference)
    held = ids[_held_rows(ROWS, 0.25)]
    assert res.nodrop_loss == pytest.approx(_ce64(fresh, held), rel=1e-4, abs=1e-5)
    ds.patch(ref, res.policy)
    assert res.loss == pytest.approx(_ce64(ref, held), rel=1e-4, abs=1e-5)
    assert res.holdout_tokens == held.numel() and res.calibration_tokens == ids.numel() - held.numel()
    # the drop rate on the search rows, measured again
    search = ids[[i for i in range(ROWS) if i not in _held_rows(ROWS, 0.25)]]
    ds.reset_stats(ref)
    with torch.no_grad():
        ref(input_ids=search, use_cache=False)
    assert ds.drop_stats(ref).overall == pytest.approx(res.drop_rate, abs=1e-9)
    get_handle(ref).revert()
    assert "chosen" in repr(res) and "skipped" in res.table()


def test_unreachable_target_warns_and_keeps_the_closest():
    """Default tiny PhiMoE: every normalised score is 0.5, so only a few drop
    rates can be reached; the closest candidate is kept, with a warning."""
    model = build("phimoe")
    batches, _ = _batches()
    with pytest.warns(RuntimeWarning, match="no candidate reached the target drop rate 0.300"):
        res = ds.tune_policy(model, batches, 0.3, metrics=("abs_gate",), bands=(0.01, 0.05), partitions=(2,),
                             per_layer=(False,), show_progress=False)
    run = [c for c in res.candidates if not c.skipped]
    assert not any(c.within_tolerance for c in run)
    best = min(abs(c.drop_rate - 0.3) for c in run)
    assert abs(res.drop_rate - 0.3) == best and get_handle(model).policy is res.policy


def test_tune_policy_keeps_an_existing_patch():
    model = build("olmoe")
    h = ds.patch(model, ds.NoDrop())
    batches, _ = _batches()
    res = ds.tune_policy(model, batches, 0.25, metrics=("abs_gate_up",), bands=(0.02,), partitions=(2,),
                         per_layer=(False,), show_progress=False)
    assert get_handle(model) is h and h.policy is res.policy and not h.reverted
    assert len(res.candidates) == 1 and res.metric == "abs_gate_up" and res.band == 0.02


def test_tune_policy_from_a_reconstructed_model_orders_from_there():
    """Tuning a model that was reconstructed before reorders it from that
    order (the result's importance is profiled on it)."""
    model = build("mixtral")
    batches, ids = _batches()
    imp = ds.profile(model, batches, "gate", show_progress=False)
    ds.reconstruct(model, imp)
    get_handle(model) is None or get_handle(model).revert()
    before = _state(model)
    res = ds.tune_policy(model, batches, 0.3, metrics=("abs_gate",), bands=(0.03,), partitions=(2,),
                         per_layer=(False,), show_progress=False)
    get_handle(model).revert()
    ref = build("mixtral")
    ref.load_state_dict(before)
    ds.reconstruct(ref, res.importance, "abs_gate")
    get_handle(ref) is None or get_handle(ref).revert()
    assert _same_state(_state(model), _state(ref))


@pytest.mark.parametrize("kwargs, err, needle", [
    (dict(target_drop_rate=0.0), ValueError, "target_drop_rate"),
    (dict(target_drop_rate=1.0), ValueError, "target_drop_rate"),
    (dict(target_drop_rate=-0.2), ValueError, "target_drop_rate"),
    (dict(target_drop_rate=float("nan")), ValueError, "target_drop_rate"),
    (dict(target_drop_rate="0.3"), ValueError, "target_drop_rate"),
    (dict(metrics=()), ValueError, "metrics is empty"),
    (dict(bands=[]), ValueError, "bands is empty"),
    (dict(partitions=()), ValueError, "partitions is empty"),
    (dict(per_layer=()), ValueError, "per_layer is empty"),
    (dict(metrics=("bogus",)), ValueError, "metrics: 'bogus'"),
    (dict(bands=(-0.01,)), ValueError, "bands"),
    (dict(partitions=(1,)), ValueError, "partitions"),
    (dict(holdout=0.0), ValueError, "holdout"),
    (dict(holdout=1.0), ValueError, "holdout"),
    (dict(partitions=(3,)), ValueError, "every candidate is impossible"),
    (dict(batches="rows1", holdout=0.9), ValueError, "no row for the search"),
    (dict(batches="rows2", holdout=0.1), ValueError, "no held-out row"),
    (dict(batches=[]), ValueError, "no calibration batches"),
])
@pytest.mark.parametrize("patched", [False, True])
def test_bad_input_is_a_clear_error_and_leaves_the_model(kwargs, err, needle, patched):
    model = build("olmoe")
    pol = ds.OneThreshold(0.1)
    h = ds.patch(model, pol) if patched else None
    before = _state(model)
    batches, ids = _batches()
    kw = dict(kwargs)
    target = kw.pop("target_drop_rate", 0.3)
    b = kw.pop("batches", batches)
    if b == "rows1":
        b = [ids[:1]]
    elif b == "rows2":
        b = [ids[:2]]
    with pytest.raises(err, match=needle):
        ds.tune_policy(model, b, target, show_progress=False, **kw)
    assert _same_state(_state(model), before)
    if patched:
        assert get_handle(model) is h and not h.reverted and h.policy is pol
    else:
        assert get_handle(model) is None or get_handle(model).reverted


def test_failure_mid_search_restores_order_and_patch_state(monkeypatch):
    model = build("qwen3_moe")
    before = _state(model)
    batches, _ = _batches()
    calls = []
    real = tune_mod._search

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(tune_mod, "_search", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ds.tune_policy(model, batches, 0.3, metrics=("gate", "abs_gate_up"), bands=(0.01,), partitions=(2,),
                       per_layer=(False, True), show_progress=False)
    assert len(calls) == 3
    assert get_handle(model) is None or get_handle(model).reverted
    assert _same_state(_state(model), before)

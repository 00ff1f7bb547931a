"""The binding's rejection paths.

Every invalid argument raises TypeError (dtype / kind of object) or
ValueError (shape, value, device, overlap, layout) with a message that names
the argument and the offending value; the `out` passed in is untouched after
a validation error; reference counts of every input and of `out` are
unchanged after a successful call and after every error.
"""
from __future__ import annotations

import ctypes
import re
import sys

import numpy as np
import pytest
import torch

from dualsparse import _C, ops

from cases import bits

T, K, E, I, H, P = 3, 2, 4, 6, 8, 2
SENTINEL = 12345.0


# ------------------------------------------------------------------ harness

def _outcome(fn):
    """(exception type, message) of fn(), or (None, result-less marker); the
    exception and its traceback are dropped here so that they keep no
    reference to any argument."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc), str(exc)
    return None, ""


def _arrays(objs):
    out = []
    for o in objs:
        if isinstance(o, (torch.Tensor, np.ndarray)):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            out.extend(_arrays(o))
    return out


class Moe:
    """A valid moe_experts call (T=3, K=2, E=4, I=6, H=8, P=2) to break one
    argument of at a time."""

    def __init__(self, kind="torch", dtype="float32"):
        g = torch.Generator().manual_seed(0)
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        x = torch.randn(T, H, generator=g).to(tdt)
        gu = (torch.randn(E, 2 * I, H, generator=g) / 3).to(tdt)
        dn = (torch.randn(E, H, I, generator=g) / 3).to(tdt)
        ids = torch.tensor([[0, 1], [2, 3], [3, 1]], dtype=torch.int64)
        tw = torch.rand(T, K, generator=g) + 0.1
        lv = torch.tensor([[2, 1], [0, 2], [1, 1]], dtype=torch.int8)
        out = torch.full((T, H), SENTINEL, dtype=tdt)
        if kind == "numpy":
            x, gu, dn, ids, tw, lv, out = (t.numpy() for t in (x, gu, dn, ids, tw, lv, out))
        self.kind = kind
        self.args = dict(x=x, topk_ids=ids, topk_weights=tw, gate_up_proj=gu, down_proj=dn, levels=lv,
                         num_partitions=P, out=out)

    def call(self, **over):
        a = {**self.args, **over}
        return ops.moe_experts(a.pop("x"), a.pop("topk_ids"), a.pop("topk_weights"), a.pop("gate_up_proj"),
                               a.pop("down_proj"), **a)

    def fresh_out(self):
        o = self.args["out"]
        return o.clone() if isinstance(o, torch.Tensor) else o.copy()


def rejects(fn, exc, patterns, objs=(), out=None, repeat=3):
    """fn() raises `exc` (exactly that class or a subclass) with every regex
    of `patterns` in its message, `repeat` times; refcounts of `objs` and
    `out` and the bytes of `out` are unchanged."""
    arrs = _arrays(list(objs) + ([out] if out is not None else []))
    if isinstance(out, torch.Tensor) and out.device.type != "cpu":
        out = None
    before_out = bits(out) if out is not None else None
    _outcome(fn)  # warm-up: first-call caches (e.g. torch's DLPack) are not leaks
    rc0 = [sys.getrefcount(a) for a in arrs]
    for _ in range(repeat):
        et, msg = _outcome(fn)
        assert et is not None, f"no exception; expected {exc.__name__} matching {patterns}"
        assert issubclass(et, exc), f"raised {et.__name__}({msg!r}); expected {exc.__name__}"
        for p in patterns:
            assert re.search(p, msg), f"message {msg!r} does not match {p!r}"
    rc1 = [sys.getrefcount(a) for a in arrs]
    assert rc0 == rc1, f"reference counts changed: {rc0} -> {rc1}"
    if out is not None:
        assert bits(out) == before_out, "out was modified by a call that failed validation"
    return msg


def moe_rejects(h, exc, patterns, **over):
    merged = {**h.args, **over}
    out = merged.get("out")
    if out is not None and not isinstance(out, (torch.Tensor, np.ndarray)):
        out = None
    return rejects(lambda: h.call(**over), exc, patterns, objs=list(merged.values()), out=out)


KINDS = ["torch", "numpy"]


def _np_or_torch(kind, a):
    return a if kind == "torch" else a.numpy()


# ------------------------------------------------------- success refcounts

@pytest.mark.parametrize("kind", KINDS)
def test_refcounts_unchanged_after_success(kind):
    h = Moe(kind)
    arrs = _arrays(list(h.args.values()))
    h.call()
    rc0 = [sys.getrefcount(a) for a in arrs]
    for _ in range(5):
        r = h.call()
        assert r is h.args["out"]
        del r
    assert [sys.getrefcount(a) for a in arrs] == rc0
    # importance, route_levels, permutation, order
    acc, cnt = np.zeros((4, E, I)), np.zeros(E)
    a2 = arrs + [acc, cnt]
    ops.neuron_importance(h.args["x"], h.args["topk_ids"], h.args["gate_up_proj"], acc, counts=cnt,
                          topk_weights=h.args["topk_weights"])
    rc0 = [sys.getrefcount(a) for a in a2]
    for _ in range(5):
        ops.neuron_importance(h.args["x"], h.args["topk_ids"], h.args["gate_up_proj"], acc, counts=cnt,
                              topk_weights=h.args["topk_weights"])
        ops.route_levels(h.args["topk_weights"], [0.3, 0.5])
        perm = np.stack([np.arange(I)[::-1]] * E)
        ops.permute_neurons(h.args["gate_up_proj"], h.args["down_proj"], perm)
        ops.importance_order(acc[1])
    assert [sys.getrefcount(a) for a in a2] == rc0


def test_refcounts_split_lists_after_success_and_error():
    h = Moe()
    gu, dn = h.args["gate_up_proj"], h.args["down_proj"]
    gates = [gu[e, :I] for e in range(E)]
    ups = [gu[e, I:] for e in range(E)]
    downs = [dn[e] for e in range(E)]
    objs = gates + ups + downs + [h.args["x"], h.args["out"]]
    call = lambda: ops.moe_experts_split(h.args["x"], h.args["topk_ids"], h.args["topk_weights"],  # noqa: E731
                                         gates, ups, downs, out=h.args["out"])
    call()
    rc0 = [sys.getrefcount(a) for a in objs]
    for _ in range(3):
        call()
    assert [sys.getrefcount(a) for a in objs] == rc0
    bad_downs = downs[:3] + [torch.zeros(H, 5)]
    rejects(lambda: ops.moe_experts_split(h.args["x"], h.args["topk_ids"], h.args["topk_weights"],
                                          gates, ups, bad_downs, out=h.args["out"]),
            ValueError, [r"down_proj\[3\]", r"\(8, 5\)"], objs=objs + bad_downs, out=None)
    del bad_downs
    assert [sys.getrefcount(a) for a in objs] == rc0


# ------------------------------------------------------------- dtypes

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["float64", "int32"])
def test_x_dtype(kind, bad):
    h = Moe(kind)
    x = h.args["x"]
    x = x.to(getattr(torch, bad)) if kind == "torch" else x.astype(bad)
    moe_rejects(h, TypeError, [r"\bx\b", bad, "float32"], x=x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_weight_dtype(kind, which):
    h = Moe(kind)
    w = h.args[which]
    w = w.double() if kind == "torch" else w.astype(np.float64)
    moe_rejects(h, TypeError, [which, "float64"], **{which: w})


@pytest.mark.parametrize("kind", KINDS)
def test_weight_dtypes_disagree(kind):
    h = Moe(kind)
    dn = h.args["down_proj"]
    dn = dn.half() if kind == "torch" else dn.astype(np.float16)
    moe_rejects(h, TypeError, ["down_proj", "float16", "gate_up_proj", "float32"], down_proj=dn)


@pytest.mark.parametrize("xdt", ["bfloat16", "float16"])
def test_x_dtype_differs_from_weights(xdt):
    h = Moe()
    x = h.args["x"].to(getattr(torch, xdt))
    moe_rejects(h, TypeError, [r"\bx is " + xdt, "float32"], x=x)
    h16 = Moe(dtype=xdt)
    moe_rejects(h16, TypeError, [r"\bx is float32", xdt], x=h.args["x"])


@pytest.mark.parametrize("kind", KINDS)
def test_out_dtype(kind):
    h = Moe(kind)
    out = torch.full((T, H), SENTINEL, dtype=torch.float16)
    out = out if kind == "torch" else out.numpy()
    moe_rejects(h, TypeError, [r"\bout is float16", "float32"], out=out)
    h16 = Moe(kind, "float16")
    out32 = h.fresh_out()
    moe_rejects(h16, TypeError, [r"\bout is float32", "float16"], out=out32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["float32", "int16", "uint8", "int8"])
def test_ids_dtype(kind, bad):
    h = Moe(kind)
    ids = h.args["topk_ids"]
    ids = ids.to(getattr(torch, bad)) if kind == "torch" else ids.astype(bad)
    moe_rejects(h, TypeError, ["topk_ids", "int32 or int64", bad], topk_ids=ids)


def test_ids_bool():
    h = Moe()
    moe_rejects(h, TypeError, ["topk_ids"], topk_ids=torch.ones(T, K, dtype=torch.bool))
    h = Moe("numpy")
    moe_rejects(h, TypeError, ["topk_ids", "bool"], topk_ids=np.ones((T, K), dtype=bool))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["float32", "float16"])
def test_levels_dtype(kind, bad):
    h = Moe(kind)
    lv = h.args["levels"]
    lv = lv.to(getattr(torch, bad)) if kind == "torch" else lv.astype(bad)
    moe_rejects(h, TypeError, ["levels", "integer", bad], levels=lv)


def test_levels_bool():
    h = Moe()
    moe_rejects(h, TypeError, ["levels"], levels=torch.ones(T, K, dtype=torch.bool))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["int64", "int32"])
def test_topk_weights_dtype(kind, bad):
    h = Moe(kind)
    tw = h.args["topk_weights"]
    tw = tw.to(getattr(torch, bad)) if kind == "torch" else tw.astype(bad)
    moe_rejects(h, TypeError, ["topk_weights", bad], topk_weights=tw)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_weights_float64_accepted(kind):
    """Routers that compute in double hand float64 weights: they are read
    (as float32 for the combine) and routed (in float64) without a copy."""
    h = Moe(kind)
    tw = h.args["topk_weights"]
    tw64 = tw.double() if kind == "torch" else tw.astype("float64")
    got = h.call(topk_weights=tw64, out=None)
    want = h.call(out=None)
    assert bits(got) == bits(want)  # float32 weights widened to float64 and back are unchanged
    lv64 = ops.route_levels(tw64, [0.3, 0.6])
    lv32 = ops.route_levels(tw, [0.3, 0.6])
    assert bits(lv64) == bits(lv32)


def test_non_native_byte_order():
    h = Moe("numpy")
    moe_rejects(h, TypeError, ["gate_up_proj", "byte order"],
                gate_up_proj=h.args["gate_up_proj"].astype(">f4"))
    moe_rejects(h, TypeError, ["topk_ids", "byte order"], topk_ids=h.args["topk_ids"].astype(">i8"))


def test_complex_dtype():
    h = Moe()
    moe_rejects(h, TypeError, ["gate_up_proj"], gate_up_proj=h.args["gate_up_proj"].to(torch.complex64))


# ------------------------------------------------------------- shapes

@pytest.mark.parametrize("kind", KINDS)
def test_x_hidden_size(kind):
    h = Moe(kind)
    x = _np_or_torch(kind, torch.zeros(T, H + 1))
    moe_rejects(h, ValueError, [r"\bx has hidden size 9", "H=8"], x=x)


@pytest.mark.parametrize("kind", KINDS)
def test_x_ndim(kind):
    h = Moe(kind)
    x1 = _np_or_torch(kind, torch.zeros(H))
    moe_rejects(h, ValueError, [r"\bx must be 2-D", r"\(8,\)"], x=x1)
    x3 = _np_or_torch(kind, torch.zeros(1, T, H))
    moe_rejects(h, ValueError, [r"\bx must be 2-D", r"\(1, 3, 8\)"], x=x3)
    # without out the Python layer says the same
    moe_rejects(h, ValueError, [r"\bx must be 2-D", r"\(8,\)"], x=x1, out=None)


@pytest.mark.parametrize("kind", KINDS)
def test_ids_rows(kind):
    h = Moe(kind)
    ids = _np_or_torch(kind, torch.zeros(T + 1, K, dtype=torch.int64))
    moe_rejects(h, ValueError, ["topk_ids has 4 rows", "T=3"], topk_ids=ids)
    ids1 = _np_or_torch(kind, torch.zeros(T, dtype=torch.int64))
    moe_rejects(h, ValueError, ["topk_ids must be 2-D", r"\(3,\)"], topk_ids=ids1)


@pytest.mark.parametrize("kind", KINDS)
def test_k_zero(kind):
    h = Moe(kind)
    z = lambda dt: _np_or_torch(kind, torch.zeros(T, 0, dtype=dt))  # noqa: E731
    moe_rejects(h, ValueError, ["topk_ids", "K >= 1"], topk_ids=z(torch.int64),
                topk_weights=z(torch.float32), levels=z(torch.int8))


@pytest.mark.parametrize("kind", KINDS)
def test_k_greater_than_e(kind):
    h = Moe(kind)
    ids = _np_or_torch(kind, torch.tensor([[0, 1, 2, 3, 0]] * T))
    tw = _np_or_torch(kind, torch.ones(T, 5))
    moe_rejects(h, ValueError, ["K=5", "E=4"], topk_ids=ids, topk_weights=tw, levels=None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(E, 2 * I - 1, H), (E, 1, H), (E, 2 * I + 1, H)])
def test_gate_up_shape(kind, shape):
    h = Moe(kind)
    gu = _np_or_torch(kind, torch.zeros(shape))
    moe_rejects(h, ValueError, ["gate_up_proj", "(E, 2*I, H)", re.escape(str(shape))], gate_up_proj=gu)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(E, 0, H), (0, 2 * I, H), (E, 2 * I, 0)])
def test_gate_up_zero_size(kind, shape):
    """An empty weight tensor is a shape error (E, I, H >= 1), reported with
    its shape; it is not "non-contiguous" (torch and NumPy call it contiguous)."""
    h = Moe(kind)
    gu = _np_or_torch(kind, torch.zeros(shape))
    assert gu.is_contiguous() if kind == "torch" else gu.flags.c_contiguous
    moe_rejects(h, ValueError, ["gate_up_proj", re.escape(str(shape))], gate_up_proj=gu)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_ndim(kind):
    h = Moe(kind)
    moe_rejects(h, ValueError, ["gate_up_proj must be 3-D", r"\(12, 8\)"],
                gate_up_proj=_np_or_torch(kind, torch.zeros(2 * I, H)))
    moe_rejects(h, ValueError, ["down_proj must be 3-D", r"\(8, 6\)"],
                down_proj=_np_or_torch(kind, torch.zeros(H, I)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(E, H, I + 1), (E - 1, H, I), (E, I, H), (E + 1, H, I)])
def test_down_shape(kind, shape):
    h = Moe(kind)
    dn = _np_or_torch(kind, torch.zeros(shape))
    moe_rejects(h, ValueError, ["down_proj", re.escape("(4, 8, 6)"), re.escape(str(shape))], down_proj=dn)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(T, H + 1), (T + 1, H), (T - 1, H)])
def test_out_shape(kind, shape):
    h = Moe(kind)
    out = _np_or_torch(kind, torch.full(shape, SENTINEL))
    moe_rejects(h, ValueError, [r"\bout must have shape", re.escape(f"({shape[0]}, {shape[1]})")], out=out)


@pytest.mark.parametrize("kind", KINDS)
def test_out_ndim(kind):
    h = Moe(kind)
    out = _np_or_torch(kind, torch.full((T * H,), SENTINEL))
    moe_rejects(h, ValueError, [r"\bout must be 2-D", r"\(24,\)"], out=out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(T, K + 1), (T + 1, K), (T, 1)])
def test_levels_shape(kind, shape):
    h = Moe(kind)
    lv = _np_or_torch(kind, torch.zeros(shape, dtype=torch.int8))
    moe_rejects(h, ValueError, ["levels", re.escape(f"({shape[0]}, {shape[1]})")], levels=lv)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(T, K + 1), (T + 1, K), (T * K,)])
def test_topk_weights_shape(kind, shape):
    h = Moe(kind)
    tw = _np_or_torch(kind, torch.ones(shape))
    pat = re.escape(str(shape)) if len(shape) == 1 else re.escape(f"({shape[0]}, {shape[1]})")
    moe_rejects(h, ValueError, ["topk_weights", pat], topk_weights=tw)


# ------------------------------------------------------ layout / alignment

@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_weights(kind):
    h = Moe(kind)
    gu, dn = h.args["gate_up_proj"], h.args["down_proj"]
    tr = gu.transpose(1, 2) if kind == "torch" else gu.transpose(0, 2, 1)
    moe_rejects(h, ValueError, ["gate_up_proj must be contiguous"], gate_up_proj=tr)
    big = _np_or_torch(kind, torch.zeros(E, 2 * I, H + 2))
    moe_rejects(h, ValueError, ["gate_up_proj must be contiguous"], gate_up_proj=big[:, :, :H])
    big = _np_or_torch(kind, torch.zeros(2 * E, 2 * I, H))
    moe_rejects(h, ValueError, ["gate_up_proj must be contiguous"], gate_up_proj=big[::2])
    big = _np_or_torch(kind, torch.zeros(E, H, I + 3))
    moe_rejects(h, ValueError, ["down_proj must be contiguous"], down_proj=big[:, :, :I])
    # an (E, H, I) strided view of an (E, I, H) tensor: right shape, not contiguous
    moe_rejects(h, ValueError, ["down_proj must be contiguous"],
                down_proj=(_np_or_torch(kind, torch.zeros(E, I, H)).transpose(1, 2) if kind == "torch"
                           else np.zeros((E, I, H), np.float32).transpose(0, 2, 1)))


def _misaligned(shape, dtype, offset):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = bytearray(n * dtype.itemsize + 16)
    base = np.frombuffer(buf, dtype=np.uint8)
    start = (-base.ctypes.data) % 16 + offset  # an aligned start, then off by `offset` bytes
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=start)


@pytest.mark.parametrize("which,dtype,offset", [
    ("gate_up_proj", np.float32, 1), ("down_proj", np.float32, 2), ("x", np.float32, 1),
    ("topk_weights", np.float32, 3), ("topk_ids", np.int64, 4), ("topk_ids", np.int32, 2),
    ("levels", np.int16, 1), ("out", np.float32, 1)])
def test_misaligned_numpy(which, dtype, offset):
    h = Moe("numpy")
    a = h.args[which]
    m = _misaligned(a.shape, dtype, offset)
    m[...] = a.astype(dtype) if which != "out" else SENTINEL
    assert m.ctypes.data % np.dtype(dtype).itemsize != 0
    moe_rejects(h, ValueError, [which, "misaligned"], **{which: m})


def test_misaligned_numpy_f16():
    h = Moe("numpy", "float16")
    gu = h.args["gate_up_proj"]
    m = _misaligned(gu.shape, np.float16, 1)
    m[...] = gu
    moe_rejects(h, ValueError, ["gate_up_proj", "misaligned"], gate_up_proj=m)


def test_misaligned_strides_numpy():
    h = Moe("numpy")
    buf = bytearray(4 * T * K * 4)
    tw = np.ndarray((T, K), dtype=np.float32, buffer=buf, strides=(4 * K + 2, 4))
    moe_rejects(h, ValueError, ["topk_weights", "stride", "misaligned"], topk_weights=tw)


@pytest.mark.parametrize("kind", KINDS)
def test_x_layout(kind):
    """Activations in any row layout (reversed rows, broadcast rows) are
    accepted: ops copies x into row-major order (it is small), and the
    result equals the call on a contiguous copy."""
    h = Moe(kind)
    xs = []
    if kind == "numpy":
        xs.append(h.args["x"][::-1])
    else:
        xs.append(torch.flip(h.args["x"], [0]))
    x1 = h.args["x"][:1]
    xs.append(x1.expand(T, H) if kind == "torch" else np.broadcast_to(x1, (T, H)))
    for x in xs:
        dense = x.contiguous() if kind == "torch" else np.ascontiguousarray(x)
        got = h.call(x=x, out=None)
        want = h.call(x=dense, out=None)
        assert bits(got) == bits(want)


@pytest.mark.parametrize("kind", KINDS)
def test_out_layout(kind):
    h = Moe(kind)
    big = _np_or_torch(kind, torch.full((H, T), SENTINEL))
    out = big.T  # column-major (T, H)
    moe_rejects(h, ValueError, [r"\bout must have unit stride"], out=out)
    row = _np_or_torch(kind, torch.full((1, H), SENTINEL))
    out0 = row.expand(T, H) if kind == "torch" else np.broadcast_to(row, (T, H))
    if kind == "numpy":  # a broadcast view is read-only in NumPy
        moe_rejects(h, ValueError, [r"\bout\b", "read-only"], out=out0)
    else:
        moe_rejects(h, ValueError, [r"\bout must have unit stride", r"\(0, 1\)"], out=out0)


# ------------------------------------------------------------- values

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("bad,pos", [(-1, (1, 0)), (E, (2, 1)), (E + 100, (0, 1)), (-2 ** 31, (0, 0))])
def test_ids_out_of_range(kind, ids_dtype, bad, pos):
    h = Moe(kind)
    ids = torch.tensor([[0, 1], [2, 3], [3, 1]], dtype=getattr(torch, ids_dtype))
    ids[pos] = bad
    ids = _np_or_torch(kind, ids)
    moe_rejects(h, ValueError, [re.escape(f"topk_ids[{pos[0]}, {pos[1]}] = {bad}"), r"\[0, 4\)"],
                topk_ids=ids)


def test_ids_out_of_range_int64_wide():
    h = Moe()
    ids = torch.tensor([[0, 1], [2, 2 ** 40], [3, 1]])
    moe_rejects(h, ValueError, [re.escape(f"topk_ids[1, 1] = {2 ** 40}")], topk_ids=ids)
    ids = torch.tensor([[0, 1], [2, 2 ** 32], [3, 1]])  # would wrap to 0 as int32
    moe_rejects(h, ValueError, [re.escape(f"topk_ids[1, 1] = {2 ** 32}")], topk_ids=ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lv_dtype,bad", [("int8", -1), ("int8", P + 1), ("uint8", 255), ("int16", -300),
                                          ("int32", 1000), ("int64", 2 ** 40), ("int64", -(2 ** 40))])
def test_levels_out_of_range(kind, lv_dtype, bad):
    h = Moe(kind)
    lv = torch.tensor([[2, 1], [0, 2], [1, 1]], dtype=getattr(torch, lv_dtype) if lv_dtype != "uint8"
                      else torch.uint8)
    lv[2, 1] = bad
    lv = _np_or_torch(kind, lv)
    moe_rejects(h, ValueError, [re.escape(f"levels[2, 1] = {bad}"), r"\[0, num_partitions=2\]"], levels=lv)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, -1, I + 1, 128])
def test_num_partitions_out_of_range(kind, bad):
    h = Moe(kind)
    moe_rejects(h, ValueError, ["num_partitions", rf"got {bad}\b", "I=6"], num_partitions=bad, levels=None)


def test_num_partitions_above_127():
    g = torch.Generator().manual_seed(1)
    I2 = 130
    x = torch.randn(2, 4, generator=g)
    gu, dn = torch.randn(2, 2 * I2, 4, generator=g), torch.randn(2, 4, I2, generator=g)
    ids, tw = torch.tensor([[0], [1]]), torch.ones(2, 1)
    ops.moe_experts(x, ids, tw, gu, dn, num_partitions=127)
    rejects(lambda: ops.moe_experts(x, ids, tw, gu, dn, num_partitions=128), ValueError,
            ["num_partitions", "127", "got 128"], objs=[x, gu, dn, ids, tw])


def test_num_partitions_huge():
    """A num_partitions beyond a C int is still "outside [1, min(127, I)]"."""
    h = Moe()
    moe_rejects(h, ValueError, ["num_partitions", str(2 ** 31)], num_partitions=2 ** 31, levels=None)
    moe_rejects(h, ValueError, ["num_partitions"], num_partitions=-(2 ** 40), levels=None)


@pytest.mark.parametrize("bad", [2.0, "2", None, True, [2]])
def test_num_partitions_not_int(bad):
    h = Moe()
    moe_rejects(h, TypeError, ["num_partitions", type(bad).__name__], num_partitions=bad)


@pytest.mark.parametrize("bad", [0, -1, 257, 1000])
def test_num_threads_out_of_range(bad):
    h = Moe()
    moe_rejects(h, ValueError, ["num_threads", rf"got {bad}\b", r"\[1, 256\]"], num_threads=bad)
    moe_rejects(Moe("numpy"), ValueError, ["num_threads", rf"got {bad}\b"], num_threads=bad)


def test_num_threads_huge():
    """2**64 threads is out of range: ValueError like 1000, not 'must be an int; got int'."""
    h = Moe()
    moe_rejects(h, ValueError, ["num_threads", str(2 ** 64)], num_threads=2 ** 64)


@pytest.mark.parametrize("bad", [1.5, 2.0, "2", True, [2]])
def test_num_threads_not_int(bad):
    h = Moe()
    moe_rejects(h, TypeError, ["num_threads", type(bad).__name__], num_threads=bad)


def test_num_threads_not_int_raw_binding():
    h = Moe()
    a = h.args
    out = a["out"]
    for bad in (1.5, "2", None):
        rejects(lambda: _C.moe_experts(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up_proj"], None,
                                       a["down_proj"], a["levels"], P, out, bad),
                TypeError, ["num_threads", type(bad).__name__], objs=list(a.values()), out=out)


# ------------------------------------------------------------- overlap

def test_out_aliases_x():
    h = Moe()
    x = h.args["x"].clone()
    moe_rejects(h, ValueError, [r"\bout shares memory"], x=x, out=x)
    buf = torch.randn(T + 1, H)
    moe_rejects(h, ValueError, [r"\bout shares memory"], x=buf[:T], out=buf[1:])


def test_out_aliases_x_numpy():
    h = Moe("numpy")
    buf = np.random.default_rng(0).standard_normal((T + 1, H)).astype(np.float32)
    moe_rejects(h, ValueError, [r"\bout shares memory"], x=buf[1:], out=buf[:T])


@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_out_aliases_weights(which):
    h = Moe()
    w = h.args[which].clone()
    out = w.view(-1)[5:5 + T * H].view(T, H)
    moe_rejects(h, ValueError, [r"\bout shares memory with the expert weights"], out=out, **{which: w})


def test_out_aliases_split_weight():
    h = Moe()
    gu, dn = h.args["gate_up_proj"].clone(), h.args["down_proj"]
    gates = [gu[e, :I] for e in range(E)]
    ups = [gu[e, I:] for e in range(E)]
    downs = [dn[e] for e in range(E)]
    out = gu[2, I:].reshape(-1)[:T * H].view(T, H)
    before = bits(gu)
    rejects(lambda: ops.moe_experts_split(h.args["x"], h.args["topk_ids"], h.args["topk_weights"],
                                          gates, ups, downs, out=out),
            ValueError, [r"\bout shares memory with the expert weights"], objs=gates + ups + downs, out=out)
    assert bits(gu) == before


def test_out_aliases_topk_weights():
    h = Moe()
    buf = torch.zeros(T * K + T * H)
    tw = buf[:T * K].view(T, K)
    tw.fill_(0.5)
    out = buf[T * K - 1:T * K - 1 + T * H].view(T, H)
    moe_rejects(h, ValueError, [r"\bout shares memory with an input"], topk_weights=tw, out=out)


def test_out_aliases_ids_and_levels():
    h = Moe()
    big = torch.zeros(T * H, dtype=torch.int64)
    ids = big[:T * K].view(T, K)
    out = big.view(torch.float32)[:T * H].view(T, H)
    moe_rejects(h, ValueError, [r"\bout shares memory with an input"], topk_ids=ids, out=out)
    big8 = torch.zeros(T * H * 4, dtype=torch.int8)
    lv = big8[-T * K:].view(T, K)
    out = big8.view(torch.float32).view(T, H)
    moe_rejects(h, ValueError, [r"\bout shares memory with an input"], levels=lv, out=out)


def test_gate_up_and_down_share_memory():
    h = Moe()
    buf = torch.randn(E * 2 * I * H + E * H * I)
    gu = buf[:E * 2 * I * H].view(E, 2 * I, H)
    dn = buf[E * 2 * I * H - 8:E * 2 * I * H - 8 + E * H * I].view(E, H, I)
    moe_rejects(h, ValueError, ["gate_up_proj and down_proj share memory"], gate_up_proj=gu, down_proj=dn)


def test_out_read_only_numpy():
    h = Moe("numpy")
    out = h.fresh_out()
    out.flags.writeable = False
    moe_rejects(h, ValueError, [r"\bout is read-only"], out=out)


# ----------------------------------------------------- devices and kinds

@pytest.mark.parametrize("which", ["x", "topk_ids", "topk_weights", "gate_up_proj", "down_proj", "levels", "out"])
def test_meta_device_tensor(which):
    """A tensor that is not on the CPU is refused with a clean ValueError that
    names the argument and the device."""
    h = Moe()
    a = h.args[which]
    meta = torch.empty(a.shape, dtype=a.dtype, device="meta")
    moe_rejects(h, ValueError, [rf"\b{which}\b", "meta|device"], **{which: meta})


def test_meta_device_importance_accum():
    m = Imp()
    meta = torch.zeros((4, E, I), dtype=torch.float64, device="meta")
    imp_rejects(m, ValueError, [r"\baccum\b", "meta|device"], accum=meta)


def test_meta_device_route_levels():
    rejects(lambda: ops.route_levels(torch.empty(3, 2, device="meta"), [0.3]), ValueError,
            [r"topk_weights", "meta|device"])


# A DLPack producer on another device, made with ctypes (no GPU needed).
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManaged(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_CAPSULE_NAME = ctypes.c_char_p(b"dltensor")
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeDLPack:
    """Exports a CPU NumPy array's memory through DLPack, claiming another
    device type (2 = CUDA, 13 = CUDA managed, 8 = Metal) or dtype."""

    def __init__(self, arr, device_type=2, device_id=0, code=None, bits=None, lanes=1):
        self.arr = np.ascontiguousarray(arr)
        codes = {"f": 2, "i": 0, "u": 1}
        self.shape = (ctypes.c_int64 * max(1, self.arr.ndim))(*self.arr.shape)
        t = _DLTensor()
        t.data = self.arr.ctypes.data
        t.device = _DLDevice(device_type, device_id)
        t.ndim = self.arr.ndim
        t.dtype = _DLDataType(codes[self.arr.dtype.kind] if code is None else code,
                              self.arr.dtype.itemsize * 8 if bits is None else bits, lanes)
        t.shape = self.shape
        t.strides = None
        t.byte_offset = 0
        self.m = _DLManaged(t, None, None)

    def __dlpack__(self, *args, **kwargs):
        return _PyCapsule_New(ctypes.addressof(self.m), _CAPSULE_NAME, None)

    def __dlpack_device__(self):
        return (self.m.dl_tensor.device.device_type, self.m.dl_tensor.device.device_id)


def test_fake_dlpack_cpu_is_accepted():
    # the fake producer itself works: on device type 1 (CPU) the call succeeds
    h = Moe()
    want = bits(h.call(out=h.fresh_out()))
    gu = FakeDLPack(h.args["gate_up_proj"].numpy(), device_type=1)
    got = h.call(gate_up_proj=gu, out=h.fresh_out())
    assert bits(got) == want


@pytest.mark.parametrize("which", ["topk_ids", "topk_weights", "gate_up_proj", "down_proj", "levels", "out"])
@pytest.mark.parametrize("dev,name", [(2, "cuda:1"), (13, "cuda_managed:1"), (8, "unsupported device")])
def test_non_cpu_dlpack_device(which, dev, name):
    h = Moe()
    fake = FakeDLPack(h.args[which].numpy(), device_type=dev, device_id=1)
    moe_rejects(h, ValueError, [rf"\b{which} is on", re.escape(name)], **{which: fake})


@pytest.mark.parametrize("code,nbits,lanes", [(5, 64, 1), (2, 8, 1), (2, 32, 2), (6, 8, 1)])
def test_unsupported_dlpack_dtype(code, nbits, lanes):
    h = Moe()
    fake = FakeDLPack(h.args["gate_up_proj"].numpy(), device_type=1, code=code, bits=nbits, lanes=lanes)
    moe_rejects(h, TypeError, ["gate_up_proj", "unsupported dtype"], gate_up_proj=fake)


@pytest.mark.parametrize("which", ["x", "topk_ids", "topk_weights", "gate_up_proj", "down_proj", "levels", "out"])
def test_python_list_instead_of_tensor(which):
    h = Moe()
    lst = h.args[which].tolist()
    moe_rejects(h, TypeError, [rf"\b{which}\b", "list"], **{which: lst})


def test_not_a_tensor_at_all():
    h = Moe()
    moe_rejects(h, TypeError, ["topk_ids", "str"], topk_ids="ids")
    moe_rejects(h, TypeError, ["gate_up_proj", "int"], gate_up_proj=3)


def test_down_proj_required_raw():
    h = Moe()
    a = h.args
    rejects(lambda: _C.moe_experts(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up_proj"], None, None,
                                   None, 1, a["out"], 1),
            TypeError, ["down_proj is required"], objs=list(a.values()), out=a["out"])


# ------------------------------------------------------------ split layout

def _split(h):
    gu, dn = h.args["gate_up_proj"], h.args["down_proj"]
    return [gu[e, :I] for e in range(E)], [gu[e, I:] for e in range(E)], [dn[e] for e in range(E)]


def _split_call(h, gates, ups, downs):
    return lambda: ops.moe_experts_split(h.args["x"], h.args["topk_ids"], h.args["topk_weights"],
                                         gates, ups, downs, out=h.args["out"])


def test_split_rejections():
    h = Moe()
    g, u, d = _split(h)
    objs = g + u + d
    out = h.args["out"]
    rejects(_split_call(h, g, u[:3], d), ValueError, ["up_proj has 3 experts", "gate_proj has 4"], objs, out)
    rejects(_split_call(h, [], [], []), ValueError, ["gate_proj is empty", "one weight tensor per expert"], objs, out)
    bad = u[:2] + [torch.zeros(I, H + 1)] + u[3:]
    rejects(_split_call(h, g, bad, d), ValueError, [r"up_proj\[2\] must have shape \(6, 8\)", r"\(6, 9\)"],
            objs + bad, out)
    bad = d[:1] + [d[1].half()] + d[2:]
    rejects(_split_call(h, g, u, bad), TypeError, [r"down_proj\[1\] is float16", r"gate_proj\[0\] is float32"],
            objs + bad, out)
    bad = g[:1] + [g[1].t().contiguous().t()] + g[2:]
    rejects(_split_call(h, bad, u, d), ValueError, [r"gate_proj\[1\] must be contiguous"], objs + bad, out)
    bad = g[:3] + [g[3].double()]
    rejects(_split_call(h, bad, u, d), TypeError, [r"gate_proj\[3\]", "float64"], objs + bad, out)
    rejects(_split_call(h, g, u, "downs"), TypeError, ["down_proj", "str"], objs, out)
    rejects(_split_call(h, g, u, torch.zeros(E, H)), ValueError, ["down_proj", r"\(4, 8\)"], objs, out)
    bad = g[:1] + [[[0.0] * H] * I] + g[2:]
    rejects(_split_call(h, bad, u, d), TypeError, [r"gate_proj\[1\]", "list"], objs + bad, out)


# ------------------------------------------------------------ route_levels

def _tw(kind="torch"):
    tw = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    return _np_or_torch(kind, tw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("thr,exc,pats", [
    ([0.5, 0.2], ValueError, ["ascending", r"thresholds\[1\] = 0\.2", r"thresholds\[0\] = 0\.5"]),
    ([0.1, 0.3, 0.2], ValueError, ["ascending", r"thresholds\[2\]"]),
    ([float("nan")], ValueError, [r"thresholds\[0\] = nan", "not finite"]),
    ([0.1, float("inf")], ValueError, [r"thresholds\[1\] = inf", "not finite"]),
    ([-float("inf"), 0.1], ValueError, [r"thresholds\[0\] = -inf", "not finite"]),
    ([], ValueError, ["thresholds", "1 to 127", "got 0"]),
    (list(np.linspace(0, 1, 128)), ValueError, ["thresholds", "1 to 127", "got 128"]),
    (["a"], TypeError, ["thresholds", "'a'"]),
    ([0.1, None], TypeError, ["thresholds", "None"]),
    (None, TypeError, ["thresholds", "None"]),
    ("0.5", TypeError, ["thresholds"]),
    ([1 + 2j], TypeError, ["thresholds"]),
])
def test_route_levels_thresholds(kind, thr, exc, pats):
    tw = _tw(kind)
    rejects(lambda: ops.route_levels(tw, thr), exc, pats, objs=[tw])


@pytest.mark.parametrize("kind", KINDS)
def test_route_levels_weights(kind):
    rows0 = _np_or_torch(kind, torch.tensor([[0.6, 0.4], [0.0, 0.0], [0.5, 0.5]]))
    rejects(lambda: ops.route_levels(rows0, [0.3]), ValueError, ["row 1 sums to 0", "normalize=False"],
            objs=[rows0])
    canc = _np_or_torch(kind, torch.tensor([[1.0, -1.0]]))
    rejects(lambda: ops.route_levels(canc, [0.3]), ValueError, ["row 0 sums to 0"], objs=[canc])
    # raw weights need no normalisation
    assert ops.route_levels(rows0, [0.3], normalize=False).tolist() == [[1, 1], [0, 0], [1, 1]]
    nan = _np_or_torch(kind, torch.tensor([[0.6, 0.4], [0.1, float("nan")]]))
    rejects(lambda: ops.route_levels(nan, [0.3]), ValueError, [r"topk_weights\[1, 1\] = nan", "not finite"],
            objs=[nan])
    rejects(lambda: ops.route_levels(nan, [0.3], normalize=False), ValueError, [r"topk_weights\[1, 1\]"],
            objs=[nan])
    inf = _np_or_torch(kind, torch.tensor([[float("inf"), 0.4]]))
    rejects(lambda: ops.route_levels(inf, [0.3]), ValueError, [r"topk_weights\[0, 0\] = inf"], objs=[inf])
    for bad in ("int32", "int64"):
        w = _tw(kind)
        w = w.to(getattr(torch, bad)) if kind == "torch" else w.astype(bad)
        rejects(lambda: ops.route_levels(w, [0.3]), TypeError, ["topk_weights", bad], objs=[w])
    w1 = _np_or_torch(kind, torch.ones(4))
    rejects(lambda: ops.route_levels(w1, [0.3]), ValueError, ["topk_weights must be 2-D", r"\(4,\)"], objs=[w1])
    w0 = _np_or_torch(kind, torch.ones(3, 0))
    rejects(lambda: ops.route_levels(w0, [0.3]), ValueError, ["topk_weights", "K >= 1"], objs=[w0])
    w = _tw(kind)
    rejects(lambda: ops.route_levels(w, [0.3], dtype="int16"), ValueError, ["dtype", "int16"], objs=[w])
    rejects(lambda: ops.route_levels(w.tolist(), [0.3]), TypeError, ["topk_weights", "list"])


def test_route_levels_raw_output_untouched_on_error():
    # the binding validates every score before writing any level
    w = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.0, 0.0]])
    lv = torch.full((3, 2), 99, dtype=torch.int8)
    rejects(lambda: _C.route_levels(w, [0.3], True, lv), ValueError, ["row 2 sums to 0"], objs=[w], out=lv)
    lv_ro = np.full((3, 2), 99, dtype=np.int8)
    lv_ro.flags.writeable = False
    rejects(lambda: _C.route_levels(w, [0.3], True, lv_ro), ValueError, ["levels is read-only"], objs=[w],
            out=lv_ro)
    for bad_dt in (np.int16, np.int64, np.uint8, np.float32):
        lvb = np.full((3, 2), 99, dtype=bad_dt)
        lvb = lvb[:2]
        rejects(lambda: _C.route_levels(w[:2], [0.3], True, lvb), TypeError, ["levels", "int8 or int32"],
                objs=[w], out=lvb)
    lvs = np.full((3, 3), 99, dtype=np.int8)
    rejects(lambda: _C.route_levels(w, [0.3], True, lvs), ValueError, ["levels", r"\(3, 3\)"], objs=[w], out=lvs)
    alias = torch.zeros(6, dtype=torch.float32)
    alias[:] = 0.5
    rejects(lambda: _C.route_levels(alias.view(3, 2), [0.3], True, alias.view(torch.int32).view(3, 2)),
            ValueError, ["levels shares memory with topk_weights"], objs=[alias])


# -------------------------------------------------------------- importance

class Imp:
    def __init__(self, kind="torch"):
        self.h = Moe(kind)
        self.acc = np.zeros((4, E, I))
        self.cnt = np.zeros(E)

    def call(self, **over):
        a = dict(x=self.h.args["x"], topk_ids=self.h.args["topk_ids"], gate_up_proj=self.h.args["gate_up_proj"],
                 accum=self.acc, counts=self.cnt, topk_weights=self.h.args["topk_weights"])
        a.update(over)
        return ops.neuron_importance(a.pop("x"), a.pop("topk_ids"), a.pop("gate_up_proj"), a.pop("accum"), **a)


def imp_rejects(m, exc, patterns, **over):
    objs = list(m.h.args.values()) + list(over.values()) + [m.cnt]
    acc = over.get("accum", m.acc)
    return rejects(lambda: m.call(**over), exc, patterns, objs=objs,
                   out=acc if isinstance(acc, (np.ndarray, torch.Tensor)) else None)


def test_importance_accum_shape():
    """accum of the wrong shape: ValueError naming accum, the expected and the received shape."""
    m = Imp()
    for shape in [(4, E, I + 1), (3, E, I), (4 * E * I,)]:
        acc = np.full(shape, SENTINEL)
        imp_rejects(m, ValueError, [r"\baccum\b", r"\(4, 4, 6\)", re.escape(str(shape))], accum=acc)


def test_importance_accumulator_dtypes():
    """accum / counts of the wrong dtype are dtype problems: TypeError naming
    the argument and the dtype received."""
    m = Imp()
    for dt in ("float32", "int64"):
        imp_rejects(m, TypeError, [r"\baccum\b", dt], accum=np.full((4, E, I), 7, dtype=dt))
        imp_rejects(m, TypeError, [r"\bcounts\b", dt], counts=np.zeros(E, dt))


def test_importance_accum_layout_and_access():
    m = Imp()
    acc = np.full((4, E, I + 1), SENTINEL)[:, :, :I]
    imp_rejects(m, ValueError, [r"\baccum\b", "contiguous"], accum=acc)
    ro = np.full((4, E, I), SENTINEL)
    ro.flags.writeable = False
    imp_rejects(m, ValueError, [r"\baccum is read-only"], accum=ro)
    imp_rejects(m, TypeError, [r"\baccum\b", "list"], accum=np.zeros((4, E, I)).tolist())
    imp_rejects(m, TypeError, [r"\baccum\b", "NoneType"], accum=None)


def test_importance_counts():
    m = Imp()
    imp_rejects(m, ValueError, [r"\bcounts\b", r"\(4,\)"], counts=np.zeros(E + 1))
    # counts overlapping accum
    acc = np.zeros(4 * E * I + E)
    imp_rejects(m, ValueError, [r"\bcounts shares memory with accum"],
                accum=acc[:4 * E * I].reshape(4, E, I), counts=acc[4 * E * I - 1:4 * E * I - 1 + E])


def test_importance_overlap_with_inputs():
    m = Imp()
    gu = m.h.args["gate_up_proj"].clone()
    acc = gu.view(-1)[:8 * E * I].view(torch.float64).view(4, E, I)
    imp_rejects(m, ValueError, [r"\baccum shares memory with the expert weights"], gate_up_proj=gu, accum=acc)
    x = torch.zeros(T, 2 * 4 * E * I // T + 2)
    xx = x[:, :H]
    acc = x.view(-1)[:8 * E * I].view(torch.float64).view(4, E, I)
    imp_rejects(m, ValueError, [r"\baccum shares memory"], x=xx, accum=acc)


def test_importance_other_arguments():
    m = Imp()
    h = m.h
    imp_rejects(m, TypeError, [r"\bx is float64"], x=h.args["x"].double())
    imp_rejects(m, ValueError, [r"\bx has hidden size 9"], x=torch.zeros(T, H + 1))
    imp_rejects(m, TypeError, ["topk_ids", "float32"], topk_ids=h.args["topk_ids"].float())
    imp_rejects(m, ValueError, ["topk_ids", "K <= E=4", r"\(3, 5\)"], topk_ids=torch.zeros(T, 5, dtype=torch.long),
                topk_weights=None)
    imp_rejects(m, ValueError, ["topk_ids", r"\(4, 2\)"], topk_ids=torch.zeros(T + 1, K, dtype=torch.long))
    bad = h.args["topk_ids"].clone()
    bad[1, 0] = E
    imp_rejects(m, ValueError, [re.escape("topk_ids[1, 0] = 4")], topk_ids=bad)
    imp_rejects(m, TypeError, ["topk_weights", "int64"], topk_weights=torch.ones(T, K, dtype=torch.long))
    imp_rejects(m, ValueError, ["topk_weights", r"\(3, 3\)"], topk_weights=torch.ones(T, K + 1))
    imp_rejects(m, ValueError, ["gate_up_proj", r"\(4, 11, 8\)"], gate_up_proj=torch.zeros(E, 2 * I - 1, H))
    imp_rejects(m, ValueError, ["gate_up_proj must be contiguous"],
                gate_up_proj=torch.zeros(E, H, 2 * I).transpose(1, 2))
    imp_rejects(m, ValueError, ["num_threads", "got 0"], num_threads=0)
    imp_rejects(m, TypeError, ["num_threads", "float"], num_threads=1.0)


# ------------------------------------------------------------ permutations

def _perm_setup(kind="torch"):
    h = Moe(kind)
    return h.args["gate_up_proj"], h.args["down_proj"]


def _perm_rejects(gu, dn, perm, exc, patterns, split=False, **kw):
    before = (bits(gu), bits(dn)) if not split else None
    if split:
        g, u, d = gu
        fn = lambda: ops.permute_neurons_split(g, u, d, perm, **kw)  # noqa: E731
        objs = g + u + d
        snap = [bits(t) for t in objs]
    else:
        fn = lambda: ops.permute_neurons(gu, dn, perm, **kw)  # noqa: E731
        objs = [gu, dn]
    rejects(fn, exc, patterns, objs=objs + ([perm] if isinstance(perm, (np.ndarray, torch.Tensor)) else []))
    if split:
        assert [bits(t) for t in objs] == snap, "weights changed by a rejected permutation"
    else:
        assert (bits(gu), bits(dn)) == before, "weights changed by a rejected permutation"


@pytest.mark.parametrize("kind", KINDS)
def test_perm_not_a_permutation(kind):
    gu, dn = _perm_setup(kind)
    ok = np.stack([np.random.default_rng(e).permutation(I) for e in range(E)])
    dup = ok.copy()
    dup[3, 1] = dup[3, 0]  # only the last expert is bad: nothing may be touched before the check
    _perm_rejects(gu, dn, dup, ValueError, [r"perm\[3\]", "appears twice"])
    for bad in (-1, I, 2 ** 40):
        p = ok.copy()
        p[2, 4] = bad
        _perm_rejects(gu, dn, p, ValueError, [re.escape(f"perm[2, 4] = {bad}"), r"\[0, I=6\)"])
    _perm_rejects(gu, dn, ok[:, :I - 1], ValueError, ["perm", r"\(4, 6\)"])
    _perm_rejects(gu, dn, ok[:E - 1], ValueError, ["perm", r"\(4, 6\)"])
    _perm_rejects(gu, dn, ok[0], ValueError, ["perm", r"\(4, 6\)"])
    _perm_rejects(gu, dn, ok, ValueError, ["num_threads", "got 0"], num_threads=0)
    _perm_rejects(gu, dn, dup, ValueError, [r"perm\[3\]"], inverse=True)


def test_perm_non_integer_values_rejected():
    """A float permutation with fractional entries is not a permutation: it
    must be refused, not truncated to integers and applied."""
    gu, dn = _perm_setup()
    p = np.stack([np.arange(I, dtype=np.float64)] * E) + 0.5
    _perm_rejects(gu, dn, p, TypeError, ["perm"])


def test_perm_split_rejections():
    h = Moe()
    g, u, d = (list(map(torch.clone, l)) for l in _split(h))
    ok = np.stack([np.arange(I)[::-1]] * E)
    dup = ok.copy()
    dup[0, 0] = dup[0, 1]
    _perm_rejects((g, u, d), None, dup, ValueError, [r"perm\[0\]", "appears twice"], split=True)
    shared = g[:1] + [g[0]] + g[2:]  # one matrix twice
    _perm_rejects((shared, u, d), None, ok, ValueError, ["share memory"], split=True)
    ro = [t.numpy().copy() for t in g]
    for a in ro:
        a.flags.writeable = False
    _perm_rejects(([a for a in ro], [t.numpy() for t in u], [t.numpy() for t in d]), None, ok, ValueError,
                  ["read-only"], split=True)
    _perm_rejects((g, u[:2], d), None, ok, ValueError, ["up_proj has 2 experts"], split=True)
    with pytest.raises(TypeError, match="down_proj"):
        ops.permute_neurons_split(g, u, "d", ok)


def test_perm_read_only_numpy_fused():
    gu, dn = _perm_setup("numpy")
    gu = gu.copy()
    gu.flags.writeable = False
    ok = np.stack([np.arange(I)[::-1]] * E)
    _perm_rejects(gu, dn, ok, ValueError, ["read-only"])


def test_importance_order_rejections():
    rejects(lambda: ops.importance_order(np.array([[1.0, np.nan]])), ValueError,
            [re.escape("importance[0, 1] = nan")])
    rejects(lambda: ops.importance_order(np.ones((2, 2, 2))), ValueError, ["2-D", r"\(2, 2, 2\)"])
    rejects(lambda: ops.importance_order([["a"]]), ValueError, [])


# ------------------------------------------------------------ SIMD control

def test_set_simd_level_rejections():
    before = ops.simd_level()
    rejects(lambda: ops.set_simd_level("avx1024"), ValueError, ["level must be one of", "'avx1024'"])
    rejects(lambda: ops.set_simd_level(3), TypeError, [])
    assert ops.simd_level() == before


# ------------------------------------------------ aliasing, lazy views, dtypes

import reference as R


def _small_moe(seed=0, T=5, K=2, E=3, H=8, I=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    dn = torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    tw = torch.rand(T, K, generator=g)
    return x, ids, tw, gu, dn


def test_timings_overlap_with_every_argument_refused():
    """timings (4 float64 values written at the end of the call) must not
    alias out, x, routing data, levels or the weights: four doubles would
    overwrite them."""
    x, ids, tw, gu, dn = _small_moe()
    T, H = x.shape
    lv = torch.full(ids.shape, 1, dtype=torch.int64)
    out = torch.empty(T, H)

    def as_f64(t):  # 4 float64 values over the first 32 bytes of t's storage
        return torch.from_numpy(t.numpy().reshape(-1).view(np.uint8)[:32].view(np.float64))

    for name, target in [("out", out), ("x", x), ("topk_ids", ids), ("topk_weights", tw), ("levels", lv),
                         ("gate_up_proj", gu), ("down_proj", dn)]:
        tm = as_f64(target)
        before = [bits(t) for t in (x, ids, tw, lv, gu, dn)]
        pat = "expert weights" if "proj" in name else "timings shares memory"
        rejects(lambda: _C.moe_experts(x, ids, tw, gu, None, dn, lv, 1, out, 1, tm), ValueError, [pat])
        assert [bits(t) for t in (x, ids, tw, lv, gu, dn)] == before, name
    tm = np.zeros(4)
    _C.moe_experts(x, ids, tw, gu, None, dn, lv, 1, out, 1, tm)
    assert np.all(tm >= 0)


def test_lazy_negative_views_read_as_their_values():
    """torch's lazy negation (the neg bit) is exported by DLPack without the
    flag: inputs are resolved (the engine reads the negated values), outputs
    and weights are refused."""
    x, ids, tw, gu, dn = _small_moe(1)
    want = R.ref_moe(-x, ids, tw, gu, dn)
    xn = x._neg_view()  # stores x, reads as -x
    assert xn.is_neg() and torch.equal(xn, -x)
    out = torch.empty_like(x)
    _C.moe_experts(xn, ids, tw, gu, None, dn, None, 1, out, 1)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-5, atol=1e-6)
    twn = tw._neg_view()  # reads as -tw
    _C.moe_experts(x, ids, twn, gu, None, dn, None, 1, out, 1)
    np.testing.assert_allclose(out.double().numpy(), R.ref_moe(x, ids, -tw, gu, dn), rtol=1e-5, atol=1e-6)
    # routing levels of a lazily negated weight matrix: the negated values
    w = torch.tensor([[-0.2, -0.8]])._neg_view()  # reads as [[0.2, 0.8]]
    assert torch.equal(w, torch.tensor([[0.2, 0.8]]))
    assert ops.route_levels(w, [0.5], normalize=False).tolist() == [[0, 1]]
    # the ops layer (which also serves the CUDA path) resolves activations
    # and routing weights, and refuses lazily negated weights
    np.testing.assert_allclose(ops.moe_experts(xn, ids, tw, gu, dn).double().numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gate_up_proj is a lazy negative view.*resolve_neg"):
        ops.moe_experts(x, ids, tw, gu._neg_view(), dn)
    with pytest.raises(ValueError, match=r"down_proj\[0\] is a lazy negative view"):
        ops.moe_experts_split(x, ids, tw, list(gu[:, :6]), list(gu[:, 6:]), [d._neg_view() for d in dn])
    # weights and outputs: refused with what to do
    rejects(lambda: _C.moe_experts(x, ids, tw, gu._neg_view(), None, dn, None, 1, out, 1), ValueError,
            ["gate_up_proj is a lazy negative view", "resolve_neg"])
    rejects(lambda: _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, out._neg_view(), 1), ValueError,
            ["out is a lazy negative view"])
    lv = torch.empty((1, 2), dtype=torch.int8)
    rejects(lambda: _C.route_levels(w, [0.5], False, lv._neg_view()), ValueError, ["levels is a lazy negative"])
    perm = torch.arange(6).repeat(3, 1)
    rejects(lambda: _C.permute_neurons(gu, None, dn._neg_view(), perm.numpy(), False, 1), ValueError,
            ["down_proj is a lazy negative view"])


def test_conjugate_views_and_unsupported_dtypes_named():
    """A complex tensor (lazily conjugated or not) is named by its torch
    dtype, never by a DLPack code."""
    x, ids, tw, gu, dn = _small_moe(2)
    out = torch.empty_like(x)
    lv = np.empty((1, 2), dtype=np.int8)
    c = torch.tensor([[0.2 + 1j, 0.8]], dtype=torch.complex64)
    rejects(lambda: _C.route_levels(c, [0.5], False, lv), TypeError, ["topk_weights has unsupported dtype torch.complex64"])
    rejects(lambda: _C.route_levels(c.conj(), [0.5], False, lv), (TypeError, ValueError),
            ["topk_weights", "conj|complex64"])
    rejects(lambda: _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, out, 1, torch.zeros(4, dtype=torch.complex128)),
            (TypeError, ValueError), ["timings"])
    rejects(lambda: _C.moe_experts(x, ids.to(torch.bool), tw, gu, None, dn, None, 1, out, 1), TypeError,
            ["topk_ids has unsupported dtype torch.bool"])
    rejects(lambda: _C.moe_experts(x, ids.to(torch.uint16), tw, gu, None, dn, None, 1, out, 1), TypeError,
            ["topk_ids has unsupported dtype torch.uint16"])


def test_self_overlapping_outputs_refused():
    """A zero-stride or interleaved output would receive two results in one
    place: refused before anything is written."""
    w = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    base = np.zeros(2, dtype=np.int8)
    lv0 = np.lib.stride_tricks.as_strided(base, shape=(2, 2), strides=(0, 1))
    rejects(lambda: _C.route_levels(w, [0.5], True, lv0), ValueError, ["levels has overlapping elements"])
    lv1 = np.lib.stride_tricks.as_strided(np.zeros(3, dtype=np.int8), shape=(2, 2), strides=(1, 1))
    rejects(lambda: _C.route_levels(w, [0.5], True, lv1), ValueError, ["levels has overlapping elements"])
    lvt = torch.zeros(2, dtype=torch.int8).expand(2, 2)
    rejects(lambda: _C.route_levels(w, [0.5], True, lvt), ValueError,
            ["levels has overlapping elements"])
    # distinct strided outputs stay accepted
    lv2 = np.zeros((2, 4), dtype=np.int32)[:, ::2]
    _C.route_levels(w, [0.5], True, lv2)
    assert lv2.tolist() == [[0, 1], [1, 0]]
    lv3 = np.zeros((2, 2), dtype=np.int8).T
    _C.route_levels(w, [0.5], True, lv3)
    assert lv3.tolist() == [[0, 1], [1, 0]]

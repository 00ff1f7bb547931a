"""Threads: bitwise results for any thread count, the torch default, the GIL
released during compute, concurrent Python callers, and fork safety."""
from __future__ import annotations

import os
import select
import threading
import time

import numpy as np
import pytest
import torch

from dualsparse import ops

from cases import CASES_BY_ID, SMALL_CASE_IDS, assert_moe_close, bits, build
from hang import HANG_S

THREAD_COUNTS = (1, 2, 3, 4, 7)
DTYPES = ("float32", "bfloat16", "float16")


def _moe(inp, nt, **kw):
    return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels,
                           num_partitions=inp.P, num_threads=nt, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", SMALL_CASE_IDS + ["H1100", "few_experts", "P_eq_I"])
def test_moe_bitwise_across_thread_counts(case_id, dtype):
    inp = build(CASES_BY_ID[case_id], dtype)
    outs = [bits(_moe(inp, nt)) for nt in THREAD_COUNTS]
    assert all(o == outs[0] for o in outs), "moe_experts results differ across thread counts"
    assert_moe_close(_moe(inp, 1), inp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "many_rows", "odd_I131_P4", "few_experts"])
def test_moe_bitwise_across_thread_counts_every_simd_level(case_id, dtype, simd_level):
    inp = build(CASES_BY_ID[case_id], dtype)
    outs = [bits(_moe(inp, nt)) for nt in THREAD_COUNTS]
    assert all(o == outs[0] for o in outs)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "many_rows", "odd_I131_P4", "empty_experts",
                                     "few_experts", "H1100"])
def test_importance_bitwise_across_thread_counts(case_id, dtype, weighted):
    inp = build(CASES_BY_ID[case_id], dtype)
    E, I = inp.case.E, inp.case.I
    res = []
    for nt in THREAD_COUNTS:
        acc = np.zeros((4, E, I))
        cnt = np.zeros(E)
        ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc, counts=cnt,
                              topk_weights=inp.tw if weighted else None, num_threads=nt)
        res.append(acc.tobytes() + cnt.tobytes())
    assert all(r == res[0] for r in res), "importance differs across thread counts"


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_across_thread_counts(dtype):
    inp = build(CASES_BY_ID["odd_I131_P4"], dtype)
    perm = np.stack([np.random.default_rng(e).permutation(inp.case.I) for e in range(inp.case.E)])
    res = []
    for nt in THREAD_COUNTS:
        gu, dn = inp.gate_up.clone(), inp.down.clone()
        ops.permute_neurons(gu, dn, perm, num_threads=nt)
        res.append(bits(gu) + bits(dn))
    assert all(r == res[0] for r in res)


def test_default_num_threads_follows_torch(torch_threads, monkeypatch):
    assert ops.default_num_threads() == torch.get_num_threads()
    seen = []
    real = ops._C.moe_experts

    def spy(*args):
        # _C.moe_experts(x, ids, tw, gu, up, down, levels, P, out, num_threads, ...)
        seen.append(args[9])
        return real(*args)

    monkeypatch.setattr(ops._C, "moe_experts", spy)
    inp = build(CASES_BY_ID["K_eq_E"], "float32")
    for n in (1, 3, 2):
        torch.set_num_threads(n)
        assert ops.default_num_threads() == n
        _moe(inp, None)
        assert seen[-1] == n, f"num_threads=None passed {seen[-1]}, torch has {n}"
    # explicit values pass through unchanged
    _moe(inp, 5)
    assert seen[-1] == 5
    _moe(inp, np.int64(4))
    assert seen[-1] == 4


def test_num_threads_more_than_work():
    # more threads than items (T=1, one expert) and than CPUs
    inp = build(CASES_BY_ID["T1"], "float32")
    a = _moe(inp, 1)
    b = _moe(inp, 64)
    assert bits(a) == bits(b)


def test_concurrent_python_threads_match_sequential():
    """Two Python threads calling the engine at once on different inputs (the
    GIL is released during compute, so the calls really overlap) get the same
    bits as sequential calls."""
    inps = [build(CASES_BY_ID["many_rows"], "float32"), build(CASES_BY_ID["odd_H67_I77_P2"], "bfloat16"),
            build(CASES_BY_ID["many_rows"], "float16", salt=1)]
    want = [bits(_moe(inp, 2)) for inp in inps]
    imp_in = build(CASES_BY_ID["odd_I131_P4"], "float32")
    E, I = imp_in.case.E, imp_in.case.I
    acc0 = np.zeros((4, E, I))
    ops.neuron_importance(imp_in.x, imp_in.ids, imp_in.gate_up, acc0, num_threads=2)
    n_iter = 15
    barrier = threading.Barrier(len(inps) + 1)
    errors = []

    def work(j):
        try:
            barrier.wait(timeout=HANG_S)
            for _ in range(n_iter):
                if j < len(inps):
                    got = bits(_moe(inps[j], 2))
                    if got != want[j]:
                        errors.append(f"thread {j}: moe result differs from the sequential one")
                else:
                    acc = np.zeros((4, E, I))
                    ops.neuron_importance(imp_in.x, imp_in.ids, imp_in.gate_up, acc, num_threads=2)
                    if acc.tobytes() != acc0.tobytes():
                        errors.append("importance result differs from the sequential one")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(inps) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_gil_released_during_compute():
    """While one thread runs a long engine call on one CPU thread, another
    Python thread keeps running: its longest stall is far shorter than the
    call.  (With the GIL held, the stall would be the whole call.)"""
    g = torch.Generator().manual_seed(7)
    E, I, H, K = 4, 384, 768, 2
    gu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    dn = torch.randn(E, H, I, generator=g) / I ** 0.5

    def problem(T):
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        tw = torch.rand(T, K, generator=g)
        return x, ids, tw, torch.empty(T, H)

    # grow the problem until one call takes >= 40 ms on one thread
    T = 256
    while True:
        x, ids, tw, out = problem(T)
        ops.moe_experts(x, ids, tw, gu, dn, out=out, num_threads=1)
        t0 = time.perf_counter()
        ops.moe_experts(x, ids, tw, gu, dn, out=out, num_threads=1)
        one = time.perf_counter() - t0
        if one >= 0.04 or T >= 8192:
            break
        T *= 2

    def call():
        ops.moe_experts(x, ids, tw, gu, dn, out=out, num_threads=1)

    reps = max(2, int(0.5 / one))
    assert one > 0.02, f"engine call too short ({one * 1e3:.1f} ms) for this check"

    def max_stall():
        done = threading.Event()

        def engine():
            for _ in range(reps):
                call()
            done.set()

        th = threading.Thread(target=engine)
        stamps = []
        th.start()
        while not done.is_set():
            stamps.append(time.perf_counter())
            sum(range(200))
        th.join()
        return float(np.max(np.diff(stamps))) if len(stamps) > 1 else float("inf")

    # one engine call takes `one` seconds; a held GIL would stall this thread
    # for about that long on every attempt.  A loaded machine may deschedule
    # us now and then, so the best of up to ten attempts decides (it stops at
    # the first that shows the GIL released).
    stalls = []
    for _ in range(10):
        stalls.append(max_stall())
        if stalls[-1] < 0.5 * one:
            break
    assert min(stalls) < 0.5 * one, (
        f"the other thread stalled {[round(s * 1e3, 1) for s in stalls]} ms during "
        f"{one * 1e3:.1f} ms engine calls: is the GIL held during compute?")


def _read_all(fd, timeout):
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_engine_works_in_forked_child():
    """After the parent used the thread pool, a forked child (where the pool's
    workers do not exist) can still run multi-threaded engine calls."""
    inp = build(CASES_BY_ID["many_rows"], "float32", kind="numpy")
    want = _moe(inp, 2)  # the parent's pool now has workers
    want4 = _moe(inp, 4)
    assert bits(want) == bits(want4)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            ok = True
            for nt in (2, 4, 1, 3):
                got = _moe(inp, nt)
                ok = ok and bits(got) == bits(want)
            os.write(w, b"ok" if ok else b"mismatch")
            code = 0
        except BaseException as exc:  # pragma: no cover
            try:
                os.write(w, repr(exc).encode()[:500])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        msg = _read_all(r, HANG_S)
    finally:
        os.close(r)
    deadline = time.monotonic() + HANG_S
    status = None
    while time.monotonic() < deadline:
        done_pid, status = os.waitpid(pid, os.WNOHANG)
        if done_pid == pid:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung (thread pool not reset after fork?)")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, msg)
    assert msg == b"ok", msg
    # and the parent still works afterwards
    assert bits(_moe(inp, 2)) == bits(want)


# ------------------------------------------------ hostile concurrent use
#
# These run in a forked child (multiprocessing, 'fork' start method) so that
# a crash or a hang is reported as a failed test instead of ending the run.
# The time limits are generous (each case takes well under ten seconds on a
# busy two-core machine); they only tell a hang from slow progress.

import multiprocessing as mp
import traceback

from dualsparse import _C

import reference as R

CHILD_TIMEOUT = 300  # seconds; a hang, not slowness, exceeds it


def _child_entry(conn, target, args):
    try:
        msg = target(*args)
        conn.send(("ok", msg))
        code = 0
    except BaseException:  # reported to the parent
        conn.send(("fail", traceback.format_exc()[-4000:]))
        code = 1
    conn.close()
    os._exit(code)


def _run_forked(target, *args, timeout=CHILD_TIMEOUT):
    """target(*args) in a forked child; returns its message, fails the test on
    an exception, a crash (signal) or a hang."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_entry, args=(child, target, args))
    p.start()
    child.close()
    got = None
    if parent.poll(timeout):
        try:
            got = parent.recv()
        except EOFError:
            got = None
    p.join(timeout=30 if got is not None else 5)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"{target.__name__}: the child hung (no result in {timeout} s)")
    if got is None:
        pytest.fail(f"{target.__name__}: the child died with exit code {p.exitcode} "
                    f"(a negative code is the signal, e.g. -11 = segmentation fault)")
    status, msg = got
    assert status == "ok", msg
    assert p.exitcode == 0, p.exitcode
    return msg


class _Mutator:
    """A Python thread that keeps assigning the given states to arr[index]
    until stopped.  The engine releases the GIL while it runs, so the writes
    land between its reads: a one-element index (the first element the
    checks read) flips many times during one call."""

    def __init__(self, arr, index, states):
        self.arr, self.index, self.states = arr, index, states
        self.stop = threading.Event()
        self.writes = 0
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for s in self.states:
                self.arr[self.index] = s
                self.writes += 1

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join(timeout=60)


def _moe_problem(seed=0, T=1 << 18, K=2, E=4, H=4, I=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    gu = (rng.standard_normal((E, 2 * I, H)) / H ** 0.5).astype(np.float32)
    dn = (rng.standard_normal((E, H, I)) / I ** 0.5).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    tw = rng.random((T, K)).astype(np.float32)
    return x, ids, tw, gu, dn


def _rows_match_one_of(out, refs, scale, what):
    """Every row of out equals (within float32 accumulation error) the same
    row of one of the references: the result of a consistent snapshot of the
    routing data of that token."""
    tol = 1e-5 * max(float(scale.max()), 1e-30) + 1e-6
    ok = np.zeros(out.shape[0], dtype=bool)
    for ref in refs:
        ok |= np.all(np.abs(out - ref) <= tol, axis=1)
    bad = np.nonzero(~ok)[0]
    assert bad.size == 0, f"{what}: rows {bad[:10].tolist()} match no consistent snapshot"


def _hostile_moe_ids(n_calls):
    """topk_ids[0, 0] flips between two valid experts and values far out of
    range while the engine runs: never a crash; each call raises a clear
    error or returns a consistent snapshot's result."""
    x, ids, tw, gu, dn = _moe_problem()
    E = gu.shape[0]
    col_a = int(ids[0, 0])
    col_b = next(e for e in range(E) if e not in ids[0])  # another valid expert
    ids_b = ids.copy()
    ids_b[0, 0] = col_b
    ref_a, sc = R.ref_moe(x, ids, tw, gu, dn, return_scale=True)
    ref_b = R.ref_moe(x, ids_b, tw, gu, dn)
    bad_val = np.int64(1) << 40
    return _mutated_moe_calls(n_calls, (x, ids, tw, gu, dn, None, 1), ids, [col_a, bad_val, col_b, -bad_val],
                              "topk_ids", [ref_a, ref_b], sc)


def _mutated_moe_calls(n_calls, problem, target, values, name, refs, sc):
    """Calls _C.moe_experts while another thread cycles target[0, 0]
    through `values`: every call either refuses `name` as out of range or
    returns the reference of one consistent snapshot."""
    x, ids, tw, gu, dn, lv, P = problem
    errors = ok = 0
    out = np.empty_like(x)
    with _Mutator(target, (0, 0), values) as m:
        for _ in range(n_calls):
            out[:] = np.nan
            try:
                _C.moe_experts(x, ids, tw, gu, None, dn, lv, P, out, 2)
            except ValueError as exc:
                assert name in str(exc) and "outside" in str(exc), str(exc)
                errors += 1
                continue
            _rows_match_one_of(out, refs, sc, f"moe_experts under mutated {name}")
            ok += 1
    assert m.writes > 0
    return f"{ok} results, {errors} errors"


def _hostile_moe_levels(n_calls):
    """levels[0, 0] flips between 2, 1 and far out of range (P = 2)."""
    x, ids, tw, gu, dn = _moe_problem(1)
    T, K = ids.shape
    lv = np.full((T, K), 2, dtype=np.int64)
    lv_b = lv.copy()
    lv_b[0, 0] = 1
    ref_a, sc = R.ref_moe(x, ids, tw, gu, dn, levels=lv, P=2, return_scale=True)
    ref_b = R.ref_moe(x, ids, tw, gu, dn, levels=lv_b, P=2)
    big = np.int64(1) << 40
    return _mutated_moe_calls(n_calls, (x, ids, tw, gu, dn, lv, 2), lv, [2, big, 1, big], "levels",
                              [ref_a, ref_b], sc)


def _hostile_importance(n_calls):
    """importance: topk_ids[0, 0] flips between a valid expert and far out
    of range; a result must equal the unmutated reference."""
    x, ids, tw, gu, dn = _moe_problem(2)
    E, I = gu.shape[0], gu.shape[1] // 2
    want, want_cnt = R.ref_importance(x, ids, None, gu)
    col = int(ids[0, 0])
    big = np.int64(1) << 40
    errors = ok = 0
    with _Mutator(ids, (0, 0), [col, big, col, -big]) as m:
        for _ in range(n_calls):
            acc = np.zeros((4, E, I))
            cnt = np.zeros(E)
            try:
                _C.importance(x, ids, None, gu, None, acc, cnt, 2)
            except ValueError as exc:
                assert "topk_ids" in str(exc), str(exc)
                assert not acc.any() and not cnt.any(), "an error after writing accum"
                errors += 1
                continue
            np.testing.assert_allclose(acc, want, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(cnt, want_cnt)
            ok += 1
    assert m.writes > 0
    return f"{ok} results, {errors} errors"


def _hostile_permute(n_calls):
    """permute_neurons: perm[0, 0] flips between its valid value and far out
    of range; the weights are either untouched (error) or exactly permuted."""
    rng = np.random.default_rng(3)
    E, I, H = 64, 1024, 2
    gu0 = rng.standard_normal((E, 2 * I, H)).astype(np.float32)
    dn0 = rng.standard_normal((E, H, I)).astype(np.float32)
    perm = np.stack([rng.permutation(I) for _ in range(E)]).astype(np.int64)
    want_gu, want_dn = R.ref_permute(gu0, dn0, perm)
    col = int(perm[0, 0])
    big = np.int64(1) << 40
    errors = ok = 0
    with _Mutator(perm, (0, 0), [col, big, col, -big]) as m:
        for _ in range(n_calls):
            gu, dn = gu0.copy(), dn0.copy()
            try:
                _C.permute_neurons(gu, None, dn, perm, False, 2)
            except ValueError as exc:
                assert str(exc).startswith("permute_neurons: perm"), str(exc)
                assert np.array_equal(gu, gu0) and np.array_equal(dn, dn0), "weights changed on error"
                errors += 1
                continue
            assert np.array_equal(gu, want_gu) and np.array_equal(dn, want_dn)
            ok += 1
    assert m.writes > 0
    return f"{ok} results, {errors} errors"


def _hostile_route_levels(n_calls):
    """route_levels: topk_weights[:, 0] flips between 0.9 (row [0.9, 0.5],
    threshold 0.6: levels [1, 0]) and -0.5 (the row sums to 0: an error).
    The checks and the levels must see the same values: a row checked at 0.9
    and computed at -0.5 would divide by zero and give levels [0, 1]."""
    T = 1 << 16
    w = np.full((T, 2), 0.5)
    w[:, 0] = 0.9
    lv = np.empty((T, 2), dtype=np.int8)
    errors = ok = 0
    with _Mutator(w, (slice(None), 0), [0.9, -0.5]) as m:
        for _ in range(n_calls):
            try:
                _C.route_levels(w, [0.6], True, lv)
            except ValueError as exc:
                assert "sums to 0" in str(exc), str(exc)
                errors += 1
                continue
            bad = np.nonzero(np.any(lv != np.array([1, 0], dtype=np.int8), axis=1))[0]
            assert bad.size == 0, f"rows {bad[:5].tolist()} have levels {lv[bad[:5]].tolist()}"
            ok += 1
    assert m.writes > 0
    return f"{ok} results, {errors} errors"


HOSTILE = {"moe_ids": _hostile_moe_ids, "moe_levels": _hostile_moe_levels,
           "importance": _hostile_importance, "permute": _hostile_permute,
           "route_levels": _hostile_route_levels}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("name", list(HOSTILE))
def test_inputs_mutated_by_another_thread_during_calls(name):
    """A Python thread keeps writing out-of-range or changing values into an
    input the engine indexes with (topk_ids, levels, perm) or reads twice
    (topk_weights) during many calls: never a crash; every call raises a
    clear error or returns the result of one consistent snapshot, compared
    with the float64 reference."""
    _run_forked(HOSTILE[name], 60)


def _release_while_calls_run():
    """release_workspace() in a loop while two threads run engine calls that
    hold the cached workspace."""
    x, ids, tw, gu, dn = _moe_problem(4, T=512, H=64, I=128)
    want = R.ref_moe(x, ids, tw, gu, dn)
    stop = threading.Event()
    errors = []

    def calls():
        out = np.empty_like(x)
        try:
            while not stop.is_set():
                _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, out, 1)
                if not np.allclose(out, want, rtol=1e-4, atol=1e-4):
                    errors.append("wrong result")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    ths = [threading.Thread(target=calls) for _ in range(2)]
    for t in ths:
        t.start()
    for _ in range(300):
        _C.release_workspace()
        time.sleep(0.001)
    stop.set()
    for t in ths:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ths), "a calling thread hung"
    assert not errors, errors
    return "ok"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_release_workspace_concurrent_with_calls_does_not_deadlock():
    """release_workspace() must not wait for the workspace lock while holding
    the GIL (a call in another thread needs the GIL to unlock it).  Runs in a
    child with a generous limit (CHILD_TIMEOUT): a deadlock never finishes,
    the loop itself takes a few seconds."""
    _run_forked(_release_while_calls_run)


def _child_uses_engine(x, ids, tw, gu, dn, want):
    _C.release_workspace()  # the workspace lock another parent thread held
    out = np.empty_like(x)
    for nt in (1, 2, 3):
        _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, out, nt)
        if out.tobytes() != want.tobytes():
            raise AssertionError(f"child result differs from the parent's (num_threads={nt})")
    return "ok"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_is_in_a_call():
    """Fork while another thread is inside an engine call (holding the
    workspace and the thread pool): the child can release the workspace and
    run multi-threaded calls with the parent's results."""
    x, ids, tw, gu, dn = _moe_problem(5, T=1024, H=64, I=256)
    want = np.empty_like(x)
    _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, want, 2)
    stop = threading.Event()
    in_call = threading.Event()
    calls = [0]

    def busy():
        out = np.empty_like(x)
        while not stop.is_set():
            in_call.set()
            _C.moe_experts(x, ids, tw, gu, None, dn, None, 1, out, 2)
            calls[0] += 1

    th = threading.Thread(target=busy, daemon=True)
    th.start()
    try:
        assert in_call.wait(60)
        for _ in range(4):
            _run_forked(_child_uses_engine, x, ids, tw, gu, dn, want, timeout=120)
    finally:
        stop.set()
        th.join(timeout=120)
    assert calls[0] > 0

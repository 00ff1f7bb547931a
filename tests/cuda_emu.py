"""Builds ``_C_cuda_emu``: the CUDA module's own sources (csrc/cuda/ds_cuda.cu,
ds_cuda_moe.cu and the CPython binding) compiled by the host C++ compiler
over the emulation in csrc/cuda/emu, so that the kernels and the host code
that plans, sizes and issues the cuBLAS GEMMs run on the CPU, with CPU
tensors standing in for device memory.

What this does not test: the CUDA runtime, the driver, real cuBLAS, real
concurrency between blocks (the emulation runs them one after another, in a
shuffled order) and speed.  The GPU tests in test_cuda.py cover those where a
device exists.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = [CSRC / "cuda" / "ds_cuda.cu", CSRC / "cuda" / "ds_cuda_moe.cu", CSRC / "cuda" / "emu" / "cuda_emu.cpp"]
C_SOURCES = [CSRC / "python" / "cuda_module.c"]
HEADERS = [CSRC / "cuda" / "ds_cuda.h", CSRC / "cuda" / "ds_cuda_internal.h", CSRC / "cuda" / "emu" / "cuda_emu.h", CSRC / "cuda" / "emu" / "cuda_emu_hooks.h",
           CSRC / "core" / "ds_core.h"]

SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def compilers():
    """(C++ compiler, C compiler) or None when there is none."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    return (cxx, cc) if cxx and cc else None


def _digest(sanitize: bool) -> str:
    h = hashlib.sha256(b"sanitize" if sanitize else b"plain")
    for p in SOURCES + C_SOURCES + HEADERS:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(out_dir: Path, sanitize: bool = False) -> Path:
    """Compiles and links the emulated module into out_dir; returns its path.
    Raises RuntimeError with the compiler's output when a step fails."""
    cxx, cc = compilers()
    out_dir = Path(out_dir) / _digest(sanitize)
    target = out_dir / ("_C_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O1", "-g", "-fPIC", "-DDS_CUDA_EMULATE", "-Wall", "-Wextra", "-Werror"]
    if sanitize:
        flags += SANITIZE
    objs = []
    steps = [[cxx, "-std=c++20", *flags, "-x", "c++", "-c", str(src), "-o", str(out_dir / (src.name + ".o"))]
             for src in SOURCES]
    steps += [[cc, *flags, "-I", sysconfig.get_paths()["include"], "-c", str(src), "-o", str(out_dir / (src.name + ".o"))]
              for src in C_SOURCES]
    objs = [cmd[-1] for cmd in steps]
    tmp = target.with_suffix(".tmp")
    steps.append([cxx, "-shared", "-pthread", *(SANITIZE if sanitize else []), *objs, "-o", str(tmp)])
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed: {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    tmp.replace(target)
    return target


def load(path: Path):
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sanitizer_preload() -> str:
    """LD_PRELOAD value for running a sanitized module in a plain Python."""
    cc = compilers()[1]
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        p = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not p or not os.path.isabs(p) or not os.path.exists(p):
            raise RuntimeError(f"{cc} has no {name}")
        libs.append(p)
    return ":".join(libs)


def _run_cases(so: str, device: str = "cpu", gemm_paths=("grouped",)) -> int:
    """Every case of the table (moe_experts in three dtypes, importance,
    route_levels), checked against the float64 reference: through the
    emulated module at `so` on CPU tensors (the body of the sanitized run in
    test_cuda_emu.py), or, with so="" and device="cuda", through
    dualsparse._C_cuda on the GPU (what scripts/cuda_check.sh runs under
    compute-sanitizer), for each GEMM path in gemm_paths ("grouped": the
    default, "loop": DUALSPARSE_CUDA_GEMM=loop)."""
    import numpy as np
    import torch

    import reference as R
    from cases import CASES, assert_moe_close, build
    from dualsparse import cuda as dcuda

    m = load(Path(so)) if so else None
    dev = torch.device(device)
    mv = (lambda t: None if t is None else t.to(dev))
    n = 0
    for path in gemm_paths:
        if path == "loop":
            os.environ["DUALSPARSE_CUDA_GEMM"] = "loop"
        else:
            os.environ.pop("DUALSPARSE_CUDA_GEMM", None)
        for case in CASES:
            for dtype in ("float32", "bfloat16", "float16"):
                inp = build(case, dtype, "torch")
                x, ids, tw, gu, dn, lvl = (mv(inp.x), mv(inp.ids), mv(inp.tw), mv(inp.gate_up), mv(inp.down),
                                           mv(inp.levels))
                out = dcuda.moe_experts(x, ids, tw, gu, dn, lvl, inp.P, None, _module=m)
                assert_moe_close(out.cpu(), inp, f"{device} {path}")
                acc = torch.zeros((4, case.E, case.I), dtype=torch.float64, device=dev)
                cnt = torch.zeros(case.E, dtype=torch.float64, device=dev)
                dcuda.neuron_importance(x, ids, gu, acc, tw, cnt, _module=m)
                ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw, inp.gate_up)
                assert np.allclose(cnt.cpu().numpy(), ref_cnt), case.id
                assert np.isfinite(acc.cpu().numpy()).all(), case.id
                if case.T:
                    lv = torch.empty(inp.tw.shape, dtype=torch.int8, device=dev)
                    dcuda.route_levels(tw, [0.2, 0.4], True, lv, _module=m)
                    s = inp.tw.double() / inp.tw.double().sum(1, keepdim=True)
                    want = (s >= 0.2).to(torch.int8) + (s >= 0.4).to(torch.int8)
                    assert torch.equal(lv.cpu(), want), case.id
                n += 1
    if device != "cpu":
        torch.cuda.synchronize()
    print(f"cases ok {n}")
    return 0


def _margins(out_dir: str) -> int:
    """Worst |result - float64 reference| / documented tolerance over the case
    table, per dtype, for the emulated CUDA module and the CPU engine (the
    figures README's CUDA section quotes)."""
    import numpy as np

    import reference as R
    from cases import CASES, build, reference
    from dualsparse import cuda as dcuda
    from dualsparse import ops

    m = load(build_module(Path(out_dir)))
    for dtype in ("float32", "bfloat16", "float16"):
        worst = []
        for case in CASES:
            if case.T == 0:
                continue
            inp = build(case, dtype, "torch")
            r, scale = reference(inp)
            tol = R.moe_tolerance(dtype, r, scale)
            emu = dcuda.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, None, _module=m)
            cpu = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels,
                                  num_partitions=inp.P)
            worst.append((float((np.abs(R.to_f64(emu) - r) / tol).max()),
                          float((np.abs(R.to_f64(cpu) - r) / tol).max()), case.id))
        e, c = max(worst), max(worst, key=lambda w: w[1])
        print(f"{dtype:9s} worst err/tol: cuda emulation {e[0]:.3f} ({e[2]}), cpu engine {c[1]:.3f} ({c[2]})")
    return 0


build_module = build

if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--run-cases":
        sys.exit(_run_cases(sys.argv[2]))
    if len(sys.argv) in (2, 3) and sys.argv[1] == "--run-cases-gpu":
        sys.exit(_run_cases("", "cuda", tuple((sys.argv[2] if len(sys.argv) == 3 else "grouped,loop").split(","))))
    if len(sys.argv) == 3 and sys.argv[1] == "--margins":
        sys.exit(_margins(sys.argv[2]))
    print("usage: cuda_emu.py --run-cases MODULE.so | --run-cases-gpu [grouped,loop] | --margins BUILD_DIR",
          file=sys.stderr)
    sys.exit(2)

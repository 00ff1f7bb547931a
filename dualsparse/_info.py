"""What `python -m dualsparse info` reports."""
from __future__ import annotations

import os
import platform
import sys

from . import _C
from ._version import __version__


def _cuda_status() -> dict:
    built = _C.build_info()["cuda"]
    from . import cuda

    _C_cuda = cuda.module()  # loads torch's CUDA runtime first, when torch is installed
    if _C_cuda is None:
        reason = built if built.startswith("not built") else f"built, but not usable: {cuda.module_error()}"
        return {"built": False, "reason": reason}
    st = _C_cuda.status()
    out = {"built": True, "build": built, "archs": st["archs"], "runtime_version": st["runtime_version"],
           "driver_version": st["driver_version"], "device_count": st["device_count"]}
    if st["device_count"] == 0:
        out["reason"] = f"no usable device: {st['reason']}"
    return out


def _cuda_path() -> dict:
    """Which backend CUDA tensors take under backend="auto", and why."""
    if sys.modules.get("torch") is None:
        return {"path": None, "reason": "torch is not installed"}
    from . import cuda

    st = cuda.status()
    return {"path": st["path"], "reason": st["reason"]}


def collect() -> dict:
    from .ops import default_num_threads

    b = _C.build_info()
    torch = sys.modules.get("torch")
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "compiler": b["compiler"],
        "cflags": b["cflags"],
        "simd_level": _C.simd_level(),
        "simd_levels": _C.simd_levels(),
        "rows_four": _C.rows_four(),
        "num_threads": default_num_threads(),
        "num_threads_source": "torch.get_num_threads()" if torch is not None else "os.sched_getaffinity",
        "cpus": os.cpu_count(),
        "torch": getattr(torch, "__version__", None),
        "cuda": _cuda_status(),
        "cuda_path": _cuda_path(),
    }


def format_info(d: dict) -> str:
    levels = ", ".join(f"{k}{'' if v else ' (unavailable)'}" for k, v in d["simd_levels"].items())
    cuda = d["cuda"]
    if cuda["built"]:
        cuda_line = (f"built ({cuda['archs']}; runtime {cuda['runtime_version']}, "
                     f"driver {cuda['driver_version'] or 'none'}, {cuda['device_count']} device(s))")
        if "reason" in cuda:
            cuda_line += f"; {cuda['reason']}"
    else:
        cuda_line = cuda["reason"]
    rows = [
        ("dualsparse", d["version"]),
        ("python", f"{d['python']} on {d['platform']}"),
        ("torch", d["torch"] or "not loaded"),
        ("compiler", d["compiler"]),
        ("build flags", d["cflags"]),
        ("SIMD level", f"{d['simd_level']}  [{levels}]"),
        ("decode rows", "four weight rows at a time (ops.rows_four)" if d.get("rows_four")
         else "one weight row at a time, short rows four (ops.rows_four)"),
        ("threads", f"{d['num_threads']} (from {d['num_threads_source']}; {d['cpus']} CPUs)"),
        ("CUDA", cuda_line),
    ]
    cp = d.get("cuda_path") or {}
    if cp.get("path"):
        rows.append(("CUDA tensors", f"backend {cp['path']!r}: {cp['reason']}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

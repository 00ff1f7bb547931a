"""The CUDA path of :mod:`dualsparse.ops` (``dualsparse._C_cuda``).

``ops.route_levels``, ``ops.moe_experts`` and ``ops.neuron_importance`` call
in here when their tensors are on a CUDA device.  Every call runs on the
tensors' device and on torch's current stream of that device; each op
synchronises that stream once (routing levels: to read 16 bytes of validation
flags; expert computation and importance: to read the per-expert row counts
that size the cuBLAS GEMMs, plus the flags).

Arguments are checked here and in C before the device is touched, with the
CPU engine's messages; ids, levels and weights are validated on the device
and reported after the one synchronisation, with the same messages.

cuBLAS is not linked: it is loaded at first use with ``dlopen``, from (in
order) the copy already loaded in this process (torch's), torch's bundled
NVIDIA wheels (``site-packages/nvidia/cublas/lib``), ``torch/lib``, then the
system's ``libcublas.so.<N>``.  The GEMMs run on torch's cuBLAS handle of the
calling thread (``torch.cuda.current_blas_handle()``, bound to torch's current
stream, with the workspace torch gave it) and the module's scratch comes from
torch's caching allocator: nothing is created or kept per thread or per call.

The module links the CUDA runtime dynamically (``libcudart.so.<major>`` of the
toolkit that built it).  :func:`module` loads torch's copy of that runtime
first, so the process has one CUDA runtime, and refuses a module built for
another CUDA major version than torch's.  :func:`available` says why the path
is not usable (no module, a module for another CUDA version, no driver, a
driver too old for the runtime, no device, a GPU the module has no code for,
no cuBLAS); callers that have a fallback (the patched HF models) use it.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import threading
from typing import List, Optional, Tuple

_DS_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3, "int8": 4, "uint8": 5,
              "int16": 6, "int32": 7, "int64": 8}

_lock = threading.Lock()
_state: dict = {}


def _torch():
    import torch

    return torch


def _dt(t) -> int:
    name = str(t.dtype).replace("torch.", "")
    return _DS_DTYPES.get(name, 99)


def _dt_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _module_file() -> Optional[str]:
    try:
        spec = importlib.util.find_spec(f"{__package__}._C_cuda")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def runtime_major(path: str) -> Optional[int]:
    """The CUDA major version whose runtime (``libcudart.so.<N>``) the module
    file at ``path`` needs, None when it names none (a static runtime)."""
    with open(path, "rb") as f:
        found = re.search(rb"libcudart\.so\.(\d+)", f.read())
    return int(found.group(1)) if found else None


def _torch_cuda_major() -> Optional[int]:
    try:
        v = _torch().version.cuda
    except Exception:  # noqa: BLE001 - torch is optional here
        return None
    return int(v.split(".")[0]) if v else None


def runtime_candidates(major: int) -> List[str]:
    """Where ``libcudart.so.<major>`` is looked for, in order: a copy already
    mapped into this process (torch's), torch's NVIDIA wheels, ``torch/lib``,
    the toolkit (CUDA_HOME, /usr/local/cuda), then the bare soname (the
    system's loader)."""
    name = f"libcudart.so.{major}"
    cands: List[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if line.strip() else ""
                if os.path.basename(p) == name and p not in cands:
                    cands.append(p)
    except OSError:
        pass
    roots = []
    try:
        import nvidia  # torch's NVIDIA wheels (namespace package)

        for base in list(getattr(nvidia, "__path__", [])):
            roots += [os.path.join(base, "cuda_runtime", "lib"), os.path.join(base, f"cu{major}", "lib")]
    except ImportError:
        pass
    try:
        roots.append(os.path.join(os.path.dirname(_torch().__file__), "lib"))
    except Exception:  # noqa: BLE001 - torch is optional here
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            roots += [os.path.join(home, "lib64"), os.path.join(home, "lib"),
                      os.path.join(home, "targets", "x86_64-linux", "lib"),
                      os.path.join(home, "targets", "sbsa-linux", "lib")]
    for root in roots:
        p = os.path.join(root, name)
        if os.path.exists(p) and p not in cands:
            cands.append(p)
    cands.append(name)
    return cands


def _load_runtime(major: int) -> None:
    """Loads the first loadable ``libcudart.so.<major>`` of
    :func:`runtime_candidates` (a no-op for one already loaded), so that the
    module's dependency on that soname resolves to it."""
    errors = []
    for cand in runtime_candidates(major):
        try:
            ctypes.CDLL(cand, mode=getattr(os, "RTLD_GLOBAL", 0))
            return
        except OSError as exc:
            errors.append(f"{cand} ({exc})")
    raise ImportError(f"the CUDA {major} runtime libcudart.so.{major} was not found: tried " + "; ".join(errors)
                      + f". Install torch with its CUDA {major} wheels or put the CUDA {major} toolkit's lib64 on "
                      "LD_LIBRARY_PATH")


def _import_module():
    """(module or None, why not)."""
    path = _module_file()
    if path is None:
        return None, ""
    try:
        major = runtime_major(path)
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"
    if major is not None:
        torch_major = _torch_cuda_major()  # imports torch first: its runtime is then the one loaded
        if torch_major is not None and torch_major != major:
            return None, (f"dualsparse._C_cuda was built with CUDA {major} but torch uses CUDA "
                          f"{_torch().version.cuda}; two CUDA runtimes cannot share the process: rebuild "
                          f"dualsparse with a CUDA {torch_major} toolkit (CUDA_HOME=..., DUALSPARSE_CUDA=1)")
        try:
            _load_runtime(major)
        except ImportError as exc:
            return None, str(exc)
    try:
        from . import _C_cuda
    except ImportError as exc:
        return None, f"importing dualsparse._C_cuda failed: {exc}"
    return _C_cuda, ""


_module_state: dict = {}


def module():
    """``dualsparse._C_cuda`` or None (see :func:`available` for why)."""
    with _lock:
        if "module" not in _module_state:
            m, why = _import_module()
            _module_state.update(module=m, why=why)
        return _module_state["module"]


def module_error() -> str:
    """Why :func:`module` returned None ("" when it did not, or when the
    module was not built: then ``_C.build_info()['cuda']`` says why)."""
    module()
    return _module_state.get("why", "")


_ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


def arch_supported(archs: str, capability) -> Tuple[bool, str]:
    """Whether code built for ``archs`` (e.g. "sm_80 sm_90 compute_90") runs
    on a GPU of compute capability ``capability`` = (major, minor): a cubin
    sm_XY runs on GPUs X.y with y >= Y; PTX compute_XY is compiled by the
    driver for any GPU of capability >= X.Y; the arch-specific sm_XYa /
    compute_XYa only on X.Y.  Archs that are not CUDA's (the tests'
    emulation) are not checked."""
    major, minor = int(capability[0]), int(capability[1])
    cc = major * 10 + minor
    parsed = [_ARCH.match(a) for a in archs.split()]
    if not parsed or not all(parsed):
        return True, ""
    for mt in parsed:
        kind, v, suffix = mt.group(1), int(mt.group(2)), mt.group(3)
        if suffix:
            ok = v == cc
        elif kind == "sm":
            ok = v // 10 == major and v <= cc
        else:
            ok = v <= cc
        if ok:
            return True, ""
    return False, (f"the GPU has compute capability {major}.{minor}, for which dualsparse._C_cuda carries no code "
                   f"(built for {archs}: a cubin sm_XY runs on GPUs X.Y and newer of the same major version, PTX "
                   f"compute_XY on any GPU from X.Y up); rebuild it with DUALSPARSE_CUDA_ARCHS=\"{major}{minor}\"")


def blas_candidates() -> List[str]:
    """Where cuBLAS is looked for, in order (before the system sonames)."""
    cands: List[str] = []
    try:  # a copy already mapped into this process (torch's)
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if line.strip() else ""
                if "libcublas.so" in os.path.basename(p) and "Lt" not in os.path.basename(p) and p not in cands:
                    cands.append(p)
    except OSError:
        pass
    major = None
    try:
        torch = _torch()
        if torch.version.cuda:
            major = torch.version.cuda.split(".")[0]
        roots = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    except Exception:  # noqa: BLE001 - torch is optional here
        roots = []
    try:
        import nvidia  # torch's NVIDIA wheels (namespace package)

        for base in list(getattr(nvidia, "__path__", [])):
            roots.insert(0, os.path.join(base, "cublas", "lib"))
            roots.insert(0, os.path.join(base, "cu13", "lib"))
    except ImportError:
        pass
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "libcublas.so*")))
        if major:  # the soname matching torch's CUDA first
            found.sort(key=lambda p: not p.endswith(f".so.{major}"))
        cands += [p for p in found if p not in cands]
    return cands


def _load_blas(m) -> Tuple[bool, str]:
    try:
        path = m.blas_load(blas_candidates(), True)
        return True, path
    except RuntimeError as exc:
        return False, str(exc)


def available(device=None) -> Tuple[bool, str]:
    """(usable, reason): whether CUDA tensors on ``device`` (default: torch's
    current CUDA device) can run through ``_C_cuda``."""
    m = module()
    with _lock:
        if "ok" not in _state:
            if m is None:
                from . import _C

                why = _module_state.get("why") or _C.build_info()["cuda"]
                _state.update(ok=False, reason=f"dualsparse._C_cuda is not available ({why})")
            else:
                st = m.status()
                if st["device_count"] == 0:
                    _state.update(ok=False, reason=f"no usable CUDA device for dualsparse._C_cuda: {st['reason']}")
                else:
                    try:  # let torch load its cuBLAS first: then that very copy is used
                        torch = _torch()
                        if torch.cuda.is_available():
                            torch.cuda.current_blas_handle()
                    except Exception:  # noqa: BLE001 - torch is optional here
                        pass
                    ok, why = _load_blas(m)
                    _state.update(ok=ok, reason="" if ok else why, blas=why if ok else "")
        if not _state["ok"]:
            return False, _state["reason"]
    return _device_supported(m, device)


def _device_supported(m, device) -> Tuple[bool, str]:
    """The GPU's compute capability against the module's code (cached per
    device)."""
    try:
        torch = _torch()
        if not torch.cuda.is_available():
            return True, ""  # nothing to check against; the module's device count said yes
        if device is None:
            idx = torch.cuda.current_device()
        else:
            d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            if d.type != "cuda":
                return True, ""
            idx = torch.cuda.current_device() if d.index is None else d.index
        key = ("arch", idx)
        if key not in _state:
            cap = torch.cuda.get_device_capability(idx)
            ok, why = arch_supported(m.status()["archs"], cap)
            if not ok:
                why = f"cuda:{idx} ({torch.cuda.get_device_name(idx)}): {why}"
            _state[key] = (ok, why)
        return _state[key]
    except Exception as exc:  # noqa: BLE001 - a failing query is a reason, not a crash
        return False, f"cannot read the GPU's compute capability: {exc}"


def require(fn: str, device=None):
    ok, reason = available(device)
    if not ok:
        raise RuntimeError(f"{fn}: CUDA tensors need the CUDA module, which is not usable: {reason}")
    return module()


def _blas_handle(m, t) -> int:
    """torch's cuBLAS handle of t's device for the calling thread, bound to
    torch's current stream of that device (what _stream(t) passes); for the
    tests' CPU tensors, the host emulation's stand-in."""
    if t.device.type == "cuda":
        torch = _torch()
        with torch.cuda.device(t.device):
            return int(torch.cuda.current_blas_handle())
    return int(m.emu_blas_handle(0))


def _stream(t) -> int:
    if t.device.type != "cuda":  # the tests' host emulation (tests/cuda_emu.py)
        return 0
    return int(_torch().cuda.current_stream(t.device).cuda_stream)


# --------------------------------------------------------------- checks

def _same_device(fn, ref, **named):
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, _torch().Tensor):
            raise TypeError(f"{fn}: {name} must be a torch tensor on {ref.device} (CUDA path); got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {ref.device}; all tensors must be on one device")


def _ndim2(fn, name, t, what):
    if t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D {what}; got shape {tuple(t.shape)}")


def _routing(fn, name, t, T, K):
    _ndim2(fn, name, t, "(tokens, top_k)")
    if T >= 0 and (t.shape[0] != T or t.shape[1] != K):
        raise ValueError(f"{fn}: {name} must have shape (T, K) = ({T}, {K}); got ({t.shape[0]}, {t.shape[1]})")


def _weights(fn, gu, dn):
    for name, w in (("gate_up_proj", gu), ("down_proj", dn)):
        if w.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D; got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(w.shape)}); experts need E, I, H >= 1")
        if not w.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous (the engine reads weights where they lie and "
                             "never copies them); make it contiguous once, e.g. param.data = param.data.contiguous()")
    E, I2, H = gu.shape
    if I2 % 2:
        raise ValueError(f"{fn}: gate_up_proj must have shape (E, 2*I, H) with E, I, H >= 1 and an even "
                         f"middle dimension; got {tuple(gu.shape)}")
    I = I2 // 2
    if tuple(dn.shape) != (E, H, I):
        raise ValueError(f"{fn}: down_proj must have shape (E, H, I) = ({E}, {H}, {I}) to match gate_up_proj; "
                         f"got {tuple(dn.shape)}")
    if dn.dtype != gu.dtype:
        raise TypeError(f"{fn}: down_proj is {_dt_name(dn)} but gate_up_proj is {_dt_name(gu)}; they must match")
    if _dt_name(gu) not in ("float32", "bfloat16", "float16"):
        raise TypeError(f"{fn}: weights must be float32, bfloat16 or float16; got {_dt_name(gu)}")
    return E, I, H


def _x(fn, x, gu, H):
    _ndim2(fn, "x", x, "(tokens, hidden)")
    if x.dtype != gu.dtype:
        raise TypeError(f"{fn}: x is {_dt_name(x)} but the expert weights are {_dt_name(gu)}; they must match")
    if x.shape[1] != H:
        raise ValueError(f"{fn}: x has hidden size {x.shape[1]} but the expert weights expect H={H}")
    if x.shape[0] > 0 and H > 1 and x.stride(1) != 1:
        raise ValueError(f"{fn}: x must have unit stride along the hidden dimension; got stride {x.stride(1)}")
    if x.shape[0] > 1 and x.stride(0) < H:
        raise ValueError(f"{fn}: x rows overlap (row stride {x.stride(0)} < H={H})")


def _ids(fn, ids, T, E):
    _ndim2(fn, "topk_ids", ids, "(tokens, top_k)")
    if _dt_name(ids) not in ("int32", "int64"):
        raise TypeError(f"{fn}: topk_ids must be int32 or int64; got {_dt_name(ids)}")
    if ids.shape[0] != T:
        raise ValueError(f"{fn}: topk_ids has {ids.shape[0]} rows but x has T={T} tokens")
    if ids.shape[1] < 1:
        raise ValueError(f"{fn}: topk_ids must have at least one column (K >= 1)")
    if ids.shape[1] > E:
        raise ValueError(f"{fn}: topk_ids has K={ids.shape[1]} columns but there are only E={E} experts (K must be <= E)")
    return ids.shape[1]


def _ptr(t) -> int:
    return 0 if t is None else int(t.data_ptr())


def _mat(t):
    if t is None:
        return (0, _DS_DTYPES["int32"], 0, 0)
    return (_ptr(t), _dt(t), int(t.stride(0)), int(t.stride(1)))


def moe_args(x, ids, tw, gu, dn, levels, P: int, out, fn: str = "moe_experts"):
    """The tuple the C entry points take, after the CPU binding's checks
    (shapes, dtypes, devices).  Works on any device (meta tensors included):
    nothing is read."""
    _same_device(fn, x, topk_ids=ids, topk_weights=tw, gate_up_proj=gu, down_proj=dn, levels=levels, out=out)
    E, I, H = _weights(fn, gu, dn)
    _x(fn, x, gu, H)
    T = x.shape[0]
    K = _ids(fn, ids, T, E)
    if tw is not None:
        _routing(fn, "topk_weights", tw, T, K)
        if _dt_name(tw) not in ("float32", "bfloat16", "float16", "float64"):
            raise TypeError(f"{fn}: topk_weights must be float32, bfloat16, float16 or float64; got {_dt_name(tw)}")
    if levels is not None:
        _routing(fn, "levels", levels, T, K)
        if levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == _torch().bool:
            raise TypeError(f"{fn}: levels must be an integer array; got {_dt_name(levels)}")
    if not 1 <= P <= min(127, I):
        raise ValueError(f"{fn}: num_partitions must be in [1, min(127, I={I})]; got {P}")
    ldo = H
    if out is not None:
        _ndim2(fn, "out", out, "(tokens, hidden)")
        if tuple(out.shape) != (T, H):
            raise ValueError(f"{fn}: out must have shape (T, H) = ({T}, {H}); got ({out.shape[0]}, {out.shape[1]})")
        if out.dtype != x.dtype:
            raise TypeError(f"{fn}: out is {_dt_name(out)} but x is {_dt_name(x)}; they must match")
        if T > 0 and ((H > 1 and out.stride(1) != 1) or (T > 1 and out.stride(0) < H)):
            raise ValueError(f"{fn}: out must have unit stride along H and non-overlapping rows; got strides {out.stride()}")
        ldo = out.stride(0) if T > 1 else H
        if T > 0 and any(t is not None and _overlap(out, t) for t in (x, ids, tw, levels)):
            raise ValueError(f"{fn}: out shares memory with an input (x, topk_ids, topk_weights or levels); "
                             "pass a separate output tensor")
        if T > 0 and (_overlap(out, gu) or _overlap(out, dn)):
            raise ValueError(f"{fn}: out shares memory with the expert weights")
    ldx = x.stride(0) if T > 1 else H
    return (T, K, E, I, H, int(P), _dt(gu), _ptr(x), int(ldx), *_mat(ids), *_mat(tw), *_mat(levels),
            _ptr(gu), _ptr(dn), _ptr(out), int(ldo))


def _extent(t):
    """[first, last) byte addresses a strided tensor can touch."""
    lo = hi = 0
    for n, s in zip(t.shape, t.stride()):
        if n == 0:
            return 0, 0
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    esz = t.element_size()
    return t.data_ptr() + lo * esz, t.data_ptr() + (hi + 1) * esz


def _overlap(a, b) -> bool:
    """Byte ranges intersect (conservative for interleaved views, like the
    CPU binding's check)."""
    if a.device.type == "meta" or b.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _extent(a)
    b0, b1 = _extent(b)
    return a0 < b1 and b0 < a1


def _workspace(nbytes: int, like):
    """(tensor, address): at least nbytes of scratch on like's device from
    torch's allocator (on the current stream), the address 256-byte aligned
    (the module's buffers inside it are 256-byte aligned from there, which
    the grouped GEMM's 16-byte alignment of 16-bit matrices relies on)."""
    buf = _torch().empty(max(int(nbytes), 1) + 256, dtype=_torch().uint8, device=like.device)
    return buf, (buf.data_ptr() + 255) // 256 * 256


#: Workspace cap of one moe_experts / neuron_importance call, in bytes: longer
#: inputs run in chunks of tokens (one synchronisation each).  The workspace
#: grows with T*K (for Mixtral-8x7B shapes in bfloat16 about 0.34 MB per
#: token); set DUALSPARSE_CUDA_MAX_WORKSPACE (bytes) or assign this.
max_workspace_bytes = 4 << 30


def _read_max_workspace():
    v = os.environ.get("DUALSPARSE_CUDA_MAX_WORKSPACE")
    if v is None:
        return
    try:
        n = int(v)
        if n < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"DUALSPARSE_CUDA_MAX_WORKSPACE must be a positive number of bytes; got {v!r}") from None
    globals()["max_workspace_bytes"] = n


_read_max_workspace()


def _chunk_rows(T: int, size_of) -> int:
    """The most tokens per call whose workspace (size_of(rows)) stays within
    max_workspace_bytes; at least 1."""
    cap = int(max_workspace_bytes)
    if size_of(T) <= cap:
        return T
    lo, hi = 1, T  # size_of grows with rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _not_capturing(fn, t):
    if t.device.type == "cuda" and _torch().cuda.is_current_stream_capturing():
        raise RuntimeError(f"{fn}: the CUDA path synchronises the stream once per call (to size its GEMMs) "
                           "and cannot be captured in a CUDA graph; run it outside the capture")


def _device_index(t) -> int:
    if t.device.type != "cuda":
        return 0
    idx = t.device.index
    return _torch().cuda.current_device() if idx is None else int(idx)


# ------------------------------------------------------------------- ops

def route_levels(topk_weights, thresholds, normalize: bool, levels, *, _module=None) -> None:
    m = _module or require("route_levels", topk_weights.device)
    if not 1 <= len(thresholds) <= 127:
        raise ValueError(f"route_levels: thresholds must hold 1 to 127 values; got {len(thresholds)}")
    if topk_weights.dim() != 2:
        raise ValueError(f"route_levels: topk_weights must be 2-D (tokens, top_k); got shape {tuple(topk_weights.shape)}")
    if _dt_name(topk_weights) not in ("float32", "bfloat16", "float16", "float64"):
        raise TypeError(f"route_levels: topk_weights must be float32, bfloat16, float16 or float64; got {_dt_name(topk_weights)}")
    T, K = topk_weights.shape
    if K < 1:
        raise ValueError("route_levels: topk_weights needs at least one column (K >= 1)")
    if T == 0:
        return
    _not_capturing("route_levels", topk_weights)
    nbytes = int(m.route_workspace_size())
    ws, wsp = _workspace(nbytes, topk_weights)
    m.route_levels(_device_index(topk_weights), _stream(topk_weights), _ptr(topk_weights), _dt(topk_weights),
                   T, K, topk_weights.stride(0), topk_weights.stride(1), [float(t) for t in thresholds],
                   bool(normalize), _ptr(levels), _dt(levels), levels.stride(0), levels.stride(1), wsp, nbytes)


def moe_experts(x, ids, tw, gu, dn, levels, P: int, out, *, _module=None):
    """out (T, H) on x's device; see ops.moe_experts.  (``_module``: the
    tests pass their host emulation of the CUDA module with CPU tensors.)"""
    fn = "moe_experts"
    m = _module or require(fn, x.device)
    if out is None:
        out = _torch().empty(x.shape, dtype=x.dtype, device=x.device) if x.dim() == 2 else None
    args = moe_args(x, ids, tw, gu, dn, levels, P, out, fn)
    nbytes = m.moe_check(args)
    T = x.shape[0]
    if T == 0:
        return out
    _not_capturing(fn, x)
    rows = _chunk_rows(T, lambda n: m.moe_check((n, *args[1:])))
    for i in range(0, T, rows):
        j = min(T, i + rows)
        part = (args if rows == T else
                moe_args(x[i:j], ids[i:j], None if tw is None else tw[i:j], gu, dn, None if levels is None else levels[i:j], P, out[i:j], fn))
        ws, wsp = _workspace(nbytes if rows == T else m.moe_check(part), x)
        m.moe_experts(_device_index(x), _stream(x), _blas_handle(m, x), part, wsp,
                      int(ws.numel()) - (wsp - ws.data_ptr()))
    return out


def neuron_importance(x, ids, gu, accum, tw, counts, *, _module=None):
    fn = "importance"
    m = _module or require(fn, x.device)
    torch = _torch()
    _same_device(fn, x, topk_ids=ids, gate_up_proj=gu, accum=accum, topk_weights=tw, counts=counts)
    if gu.dim() != 3 or gu.shape[1] % 2:
        raise ValueError(f"{fn}: gate_up_proj must have shape (E, 2*I, H) with E, I, H >= 1 and an even "
                         f"middle dimension; got {tuple(gu.shape)}")
    if not gu.is_contiguous():
        raise ValueError(f"{fn}: gate_up_proj must be contiguous (the engine reads weights where they lie and "
                         "never copies them); make it contiguous once, e.g. param.data = param.data.contiguous()")
    E, I2, H = gu.shape
    I = I2 // 2
    _x(fn, x, gu, H)
    T = x.shape[0]
    K = _ids(fn, ids, T, E)
    if tw is not None:
        _routing(fn, "topk_weights", tw, T, K)
    if accum.dtype != torch.float64:
        raise TypeError(f"{fn}: accum must be float64; got {_dt_name(accum)}")
    if tuple(accum.shape) != (4, E, I) or not accum.is_contiguous():
        raise ValueError(f"{fn}: accum must be a contiguous array of shape (4, E, I) = (4, {E}, {I}); got {tuple(accum.shape)}")
    if counts is not None:
        if counts.dtype != torch.float64:
            raise TypeError(f"{fn}: counts must be float64; got {_dt_name(counts)}")
        if tuple(counts.shape) != (E,) or not counts.is_contiguous():
            raise ValueError(f"{fn}: counts must be a contiguous array of shape (E,) = ({E},); got {tuple(counts.shape)}")
    # importance reads no down weights and no levels: gate_up stands in for
    # the down pointer, out is unused
    weighted = tw is not None

    def pack(lo, hi):
        n = hi - lo
        xs = x[lo:hi]
        ldx = int(xs.stride(0)) if n > 1 else H
        return (n, K, E, I, H, 1, _dt(gu), _ptr(xs), ldx, *_mat(ids[lo:hi]),
                *_mat(None if tw is None else tw[lo:hi]), *_mat(None), _ptr(gu), _ptr(gu), 0, H)

    rest = (_ptr(accum), _ptr(counts))
    args = pack(0, T)
    nbytes = m.importance_check(0, 0, args, weighted, *rest, 0, 0)
    if T == 0:
        return accum
    _not_capturing(fn, x)
    rows = _chunk_rows(T, lambda n: m.importance_check(0, 0, (n, *args[1:]), weighted, *rest, 0, 0))
    for i in range(0, T, rows):
        part = args if rows == T else pack(i, min(T, i + rows))
        ws, wsp = _workspace(nbytes if rows == T else m.importance_check(0, 0, part, weighted, *rest, 0, 0), x)
        m.importance(_device_index(x), _stream(x), _blas_handle(m, x), part, weighted, *rest, wsp,
                     int(ws.numel()) - (wsp - ws.data_ptr()))
    return accum


def moe_workspace_size(T: int, K: int, E: int, I: int, H: int, P: int = 1, dtype: str = "bfloat16") -> int:
    """Device workspace in bytes of one moe_experts call (no device needed)."""
    m = module()
    if m is None:
        raise RuntimeError("dualsparse._C_cuda is not built")
    p = 1 << 12  # a non-null stand-in pointer: nothing is read
    args = (T, K, E, I, H, P, _DS_DTYPES[dtype], p, H, p, 8, K, 1, p, 0, K, 1, 0, 7, 0, 0, p, p, p, H)
    return int(m.moe_check(args))


__all__ = ["available", "require", "module", "module_error", "blas_candidates", "runtime_candidates", "runtime_major",
           "arch_supported", "moe_args", "moe_workspace_size", "route_levels", "moe_experts", "neuron_importance"]


# ------------------------------------------------- which path CUDA takes

_selftests: dict = {}


def _device_key(device) -> str:
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _self_test_inputs(device, dtype):
    """A small problem that crosses the module's paths: odd sizes, empty
    experts, two partitions with dropped, partial and full pairs."""
    torch = _torch()
    g = torch.Generator().manual_seed(1234)
    T, H, I, E, K, P = 37, 72, 40, 6, 2, 2
    x = torch.randn(T, H, generator=g)
    gu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    dn = torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = torch.rand(T, E - 1, generator=g).argsort(dim=1)[:, :K]  # expert E-1 never chosen
    tw = torch.rand(T, K, generator=g) + 0.05
    levels = torch.randint(0, P + 1, (T, K), generator=g).to(torch.int8)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), ids.to(**to), tw.to(**to), gu.to(dtype=dtype, **to),
            dn.to(dtype=dtype, **to), levels.to(**to), P)


def self_test(device=None, *, _module=None, refresh: bool = False) -> Tuple[bool, str]:
    """(passed, detail): ``dualsparse._C_cuda`` against the torch backend on
    ``device`` (default: the current CUDA device), float32, bfloat16 and
    float16, with drops and partial pairs.  Run once per device and cached
    (``refresh=True`` runs it again); any exception counts as a failure and
    its message is the detail."""
    torch = _torch()
    key = _device_key("cuda" if device is None else device)
    with _lock:
        if not refresh and key in _selftests:
            return _selftests[key]
    from . import _torch_moe

    result = (True, "")
    try:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2.0 ** -5), (torch.float16, 2.0 ** -8)):
            x, ids, tw, gu, dn, levels, P = _self_test_inputs(torch.device(key), dtype)
            got = moe_experts(x, ids, tw, gu, dn, levels, P, None, _module=_module)
            ref = _torch_moe.moe(x, ids, tw, _torch_moe._Weights(gu=gu, dn=dn), levels, P,
                                 torch.empty_like(x), "self_test")
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            g, r = got.double(), ref.double()
            scale = float(r.abs().max())
            err = float((g - r).abs().max()) if bool(torch.isfinite(g).all()) else float("inf")
            if not err <= tol * max(scale, 1e-6):
                result = (False, f"{str(dtype).replace('torch.', '')} outputs differ from the torch backend by "
                                 f"{err:.3g} (output scale {scale:.3g}, allowed {tol * scale:.3g})")
                break
    except Exception as exc:  # noqa: BLE001 - a failing module must not break the caller
        result = (False, f"{type(exc).__name__}: {exc}")
    with _lock:
        _selftests[key] = result
    return result


def path(device=None) -> Tuple[str, str]:
    """("cuda" or "torch", why): the backend ``backend="auto"`` gives CUDA
    tensors on ``device``."""
    torch = _torch()
    if not torch.cuda.is_available():
        return "torch", "torch sees no CUDA device (torch.cuda.is_available() is False)"
    ok, reason = available()
    if not ok:
        return "torch", f"dualsparse._C_cuda is not usable: {reason}"
    key = _device_key("cuda" if device is None else device)
    passed, detail = self_test(key)
    if not passed:
        return "torch", f"dualsparse._C_cuda failed its self-test on {key} against the torch backend: {detail}"
    return "cuda", f"dualsparse._C_cuda is built, loads and passed its self-test on {key}"


def status(device=None) -> dict:
    """Which path ``backend="auto"`` takes for CUDA tensors, and why:
    ``{"path": "cuda" | "torch", "reason": str, "module": str,
    "self_test": {device: (passed, detail)}, "grouped_mm": {...}}``.
    Runs the self-test on ``device`` (default: the current device) when a
    device and a usable module exist."""
    torch = _torch()
    ok, why = available()
    out = {"module": "usable" if ok else f"not usable: {why}"}
    out["path"], out["reason"] = path(device)
    with _lock:
        out["self_test"] = dict(_selftests)
    if torch.cuda.is_available():
        from . import _torch_moe

        dev = torch.device(_device_key("cuda" if device is None else device))
        out["grouped_mm"] = {str(dt).replace("torch.", ""): _torch_moe.capabilities(dev, dt)
                             for dt in (torch.float32, torch.bfloat16, torch.float16)}
    return out


__all__ += ["self_test", "path", "status"]

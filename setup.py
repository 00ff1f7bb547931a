"""Build of dualsparse's C extensions.

dualsparse._C       always: csrc/core (C11) + csrc/python, NumPy C API.
dualsparse._C_cuda  when nvcc and an NVIDIA driver are found: csrc/cuda (nvcc)
                    + its binding, linked to the shared CUDA runtime.

Environment switches:
  DUALSPARSE_CUDA=auto|0|1     auto (default): build the CUDA module when nvcc is
                               found AND the machine has an NVIDIA driver
                               (/proc/driver/nvidia/version exists or
                               libcuda.so.1 loads), and, when torch is
                               importable with CUDA, nvcc's CUDA major version
                               is torch's; 0: never; 1: always (fails without
                               nvcc or with a CUDA major other than torch's)
  DUALSPARSE_CUDA_ARCHS="80 90"  compute capabilities (PTX of the last is added)
  DUALSPARSE_DEBUG=1           -O0 -g and the core's debug asserts
  DUALSPARSE_SANITIZE=address,undefined   sanitizer build (load the sanitizer
                               runtime with LD_PRELOAD when importing)
  DUALSPARSE_CFLAGS="..."      extra compiler flags (e.g. -march=native; never
                               the default: SIMD paths are chosen at run time)
  DUALSPARSE_BUILD_JOBS=N      compiler processes at a time (default: the CPU
                               count, at most 8)
"""
import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def _rel(p):
    return str(Path(p).relative_to(HERE))


def _env_flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _cflags():
    flags = ["-std=c11", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
    if _env_flag("DUALSPARSE_DEBUG"):
        flags += ["-O0", "-g", "-DDS_DEBUG"]
    else:
        flags += ["-O3"]
    san = os.environ.get("DUALSPARSE_SANITIZE", "").strip()
    if san:
        flags += [f"-fsanitize={san}", "-fno-omit-frame-pointer", "-g"]
    flags += shlex.split(os.environ.get("DUALSPARSE_CFLAGS", ""))
    return flags


def _find_nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_libdir(nvcc):
    """The folder holding the toolkit's libcudart.so (nvcc may be a wrapper
    script outside the toolkit, so several homes are tried)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            cand = Path(home) / sub
            if (cand / "libcudart.so").exists():
                return cand
    raise RuntimeError(f"libcudart.so not found under {homes}; set CUDA_HOME")


def _nvcc_version(nvcc):
    """(major, minor) of nvcc's CUDA release, e.g. (13, 0)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read the CUDA release from `{nvcc} --version`: {out.strip()[-200:]}")
    return int(found.group(1)), int(found.group(2))


def _torch_cuda():
    """torch.version.cuda of the torch importable here, None without torch
    or for a CPU build (in an isolated pip build torch is usually absent:
    dualsparse.cuda then checks the match when the module is loaded)."""
    try:
        res = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    v = res.stdout.strip().splitlines()[-1:] if res.returncode == 0 else []
    return v[0] if v and v[0] else None


def _nvidia_driver():
    """Where an NVIDIA driver was found ("" when none): its /proc entry (a
    loaded kernel module) or a loadable libcuda.so.1 (the user-space driver,
    e.g. in containers and WSL, which have no /proc entry)."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return "/proc/driver/nvidia/version"
    try:
        ctypes.CDLL("libcuda.so.1")
        return "libcuda.so.1"
    except OSError:
        return ""


def _c_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _jobs():
    raw = os.environ.get("DUALSPARSE_BUILD_JOBS", "0")
    try:
        n = int(raw)
    except ValueError:
        raise SystemExit(f"DUALSPARSE_BUILD_JOBS must be an integer; got {raw!r}")
    return n if n > 0 else min(os.cpu_count() or 1, 8)


def _parallel_compile(compiler, jobs):
    """Makes compiler.compile run one compiler process per source file, up
    to `jobs` at a time (setuptools compiles an extension's sources one after
    another); the objects come back in source order."""
    serial = getattr(compiler, "compile", None)
    if serial is None:   # not a distutils compiler (nothing to compile through it)
        return

    def compile(sources, *args, **kwargs):
        if jobs < 2 or len(sources) < 2:
            return serial(sources, *args, **kwargs)
        with ThreadPoolExecutor(jobs) as pool:
            parts = list(pool.map(lambda src: serial([src], *args, **kwargs), sources))
        return [obj for part in parts for obj in part]

    compiler.compile = compile


class BuildExt(build_ext):
    """Builds the CUDA module first (if asked), then the core extension with
    a record of what happened to CUDA, so `python -m dualsparse info` can say
    why it is missing."""

    def run(self):
        # setuptools clears `inplace` while it builds, then copies the results into the tree
        self._into_tree = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        _parallel_compile(self.compiler, _jobs())
        mode = os.environ.get("DUALSPARSE_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"DUALSPARSE_CUDA must be auto, 0 or 1; got {mode!r}")
        cuda_exts = [e for e in self.extensions if e.name.endswith("_C_cuda")]
        self._all_cuda_exts = list(cuda_exts)
        core_exts = [e for e in self.extensions if not e.name.endswith("_C_cuda")]
        nvcc = _find_nvcc() if mode != "0" else None
        driver = _nvidia_driver() if mode == "auto" and nvcc else ""
        if mode == "0":
            status = "not built: disabled by DUALSPARSE_CUDA=0"
            cuda_exts = []
        elif nvcc is None:
            if mode == "1":
                raise SystemExit("DUALSPARSE_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
            status = "not built: nvcc not found at build time (DUALSPARSE_CUDA=auto)"
            cuda_exts = []
        elif mode == "auto" and not driver:
            status = ("not built: no NVIDIA driver on the build machine (no /proc/driver/nvidia/version, "
                      "libcuda.so.1 does not load; DUALSPARSE_CUDA=auto; DUALSPARSE_CUDA=1 builds it anyway)")
            cuda_exts = []
        else:
            status = ""
        if cuda_exts:
            try:
                major, minor = _nvcc_version(nvcc)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                if mode == "1":
                    raise SystemExit(f"DUALSPARSE_CUDA=1: {exc}")
                status, cuda_exts = f"not built: {exc}", []
        if cuda_exts:
            torch_cuda = _torch_cuda()
            if torch_cuda and int(torch_cuda.split(".")[0]) != major:
                msg = (f"nvcc ({nvcc}) is CUDA {major}.{minor} but torch uses CUDA {torch_cuda}: the module must "
                       f"use torch's CUDA runtime; set CUDA_HOME (or NVCC) to a CUDA {torch_cuda.split('.')[0]} "
                       "toolkit")
                if mode == "1":
                    raise SystemExit(f"DUALSPARSE_CUDA=1: {msg}")
                status, cuda_exts = f"not built: {msg}", []
        if cuda_exts:
            archs = os.environ.get("DUALSPARSE_CUDA_ARCHS", "80 90").split()
            status = (f"built with {nvcc} (CUDA {major}.{minor}, runtime libcudart.so.{major}, archs "
                      f"{' '.join(f'sm_{a}' for a in archs)} compute_{archs[-1]})")
        built_cuda = []
        for ext in cuda_exts:
            try:
                self._build_cuda(ext, nvcc)
                built_cuda.append(ext)
            except Exception as exc:  # noqa: BLE001 - reported, then re-raised for mode 1
                if mode == "1":
                    raise
                first = str(exc).strip().splitlines()[-1:] or ["unknown error"]
                status = f"not built: nvcc build failed ({first[0][:200]})"
                self.warn(f"dualsparse: CUDA module skipped: {exc}")
        self.extensions = core_exts + built_cuda
        for ext in self._all_cuda_exts:
            if ext in built_cuda:
                continue
            # a CUDA module left by an earlier build of this tree would be
            # imported beside a core that says it was not built
            if getattr(self, "_into_tree", False):
                stale = Path(__file__).resolve().parent / self.get_ext_filename(ext.name)
                if stale.exists():
                    self.announce(f"dualsparse: removing {stale} from an earlier build ({status})", level=2)
                    stale.unlink()
        for ext in core_exts:
            ext.define_macros.append(("DS_CUDA_BUILD_STATUS", _c_string(status)))
            ext.define_macros.append(("DS_BUILD_CFLAGS", _c_string(" ".join(ext.extra_compile_args))))
            cc = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else "cc"
            ext.define_macros.append(("DS_BUILD_COMPILER", _c_string(self._compiler_version(cc))))
            self.build_extension(ext)

    @staticmethod
    def _compiler_version(cc):
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
            return (out.stdout.splitlines() or [cc])[0].strip()
        except (OSError, subprocess.SubprocessError):
            return cc

    def _build_cuda(self, ext, nvcc):
        archs = os.environ.get("DUALSPARSE_CUDA_ARCHS", "80 90").split()
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        arch_list = " ".join([f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"])
        cu = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        objdir = Path(self.build_temp) / "cuda"
        objdir.mkdir(parents=True, exist_ok=True)
        objs, cmds = [], []
        for src in cu:
            obj = objdir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "--compiler-options",
                   "-fPIC,-fvisibility=hidden", f'-DDS_CUDA_ARCHS="{arch_list}"', *gencode]
            self.announce(" ".join(cmd), level=2)
            cmds.append((src, cmd))
            objs.append(str(obj))
        # the .cu files compile side by side (nvcc runs one host compiler and
        # one device pass per architecture, one after another)
        with ThreadPoolExecutor(_jobs()) as pool:
            results = list(pool.map(lambda sc: (sc[0], subprocess.run(sc[1], capture_output=True, text=True)), cmds))
        for src, res in results:
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr}")
        ext.extra_objects = objs + ext.extra_objects
        ext.depends = list(ext.depends) + cu  # a changed .cu relinks the module
        ext.library_dirs.append(str(_cuda_libdir(nvcc)))
        # The shared CUDA runtime (libcudart.so.<major>), no rpath: dualsparse.cuda
        # loads torch's copy of it before importing the module, so the process
        # has one CUDA runtime (a static one would be a second, and would need
        # a driver as new as the toolkit that built it).
        ext.libraries += ["cudart", "dl", "pthread", "stdc++"]
        self.build_extension(ext)


def _extensions():
    import numpy

    cflags = _cflags()
    ldflags = []
    san = os.environ.get("DUALSPARSE_SANITIZE", "").strip()
    if san:
        ldflags.append(f"-fsanitize={san}")
    core_sources = sorted(_rel(p) for p in (CSRC / "core").glob("*.c"))
    core = Extension(
        "dualsparse._C",
        sources=core_sources + [_rel(CSRC / "python" / "module.c")],
        include_dirs=[numpy.get_include()],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        libraries=["m", "pthread"],
        define_macros=[],
        depends=[_rel(p) for p in (CSRC / "core").glob("*.h")] + [_rel(CSRC / "python" / "ds_dlpack.h")],
    )
    cuda = Extension(
        "dualsparse._C_cuda",
        sources=[_rel(CSRC / "cuda" / "ds_cuda.cu"), _rel(CSRC / "cuda" / "ds_cuda_moe.cu"), _rel(CSRC / "python" / "cuda_module.c")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=[_rel(p) for p in (CSRC / "cuda").glob("*.h")] + [_rel(CSRC / "core" / "ds_core.h")],
    )
    return [core, cuda]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})

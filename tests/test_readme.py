"""Every ```python block of README.md runs as written.

Each block runs alone (no state shared with other blocks) in a fresh
Python process, in a temporary working directory, offline, with this
checkout first on the path.  A block preceded by the line

    <!-- readme-test: skip (reason) -->

is skipped with that reason; a block importing a package that is not
installed (e.g. lm_eval) is skipped naming it.  The timeout only detects a
hang (tests/hang.py).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
from hang import HANG_S

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")


def python_blocks(text: str):
    """[(line of the opening fence, code, skip reason or None)]."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            lang = fence[3:].strip()
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README.md line {start + 1}: unclosed ``` fence")
            if lang == "python":
                prev = lines[start - 1].strip() if start else ""
                m = SKIP.match(prev)
                out.append((start + 1, "\n".join(body) + "\n", m.group("reason").strip() if m else None))
        i += 1
    return out


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks_and_no_stray_markers():
    assert len(BLOCKS) >= 4
    lines = README.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if "readme-test" in line:
            assert SKIP.match(line.strip()), f"README.md line {n + 1}: malformed marker {line!r}"
            nxt = lines[n + 1].strip() if n + 1 < len(lines) else ""
            assert nxt == "```python", f"README.md line {n + 1}: a skip marker must directly precede a ```python block"


def missing_modules(code: str):
    """Top-level modules the block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != "dualsparse" and importlib.util.find_spec(n) is None)


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_python_block(line, code, skip, tmp_path):
    if skip is not None:
        pytest.skip(f"README.md line {line}: {skip}")
    compile(code, f"README.md:{line}", "exec")   # a syntax error fails here, before any run
    missing = missing_modules(code)
    if missing:
        pytest.skip(f"README.md line {line}: needs {', '.join(missing)} (not installed)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg",
               TOKENIZERS_PARALLELISM="false")
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code, encoding="utf-8")
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=HANG_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {line}: still running after {HANG_S:g} s (a hang)")
    assert r.returncode == 0, (f"README.md line {line} failed (exit {r.returncode}):\n{code}\n--- stdout\n"
                               f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}")

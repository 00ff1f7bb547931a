#!/usr/bin/env python
"""Long randomised differential run of the C engine against the float64
reference (tests/reference.py), for a set time.

Each case is one seeded example from tests/test_fuzz.py: random shapes
(zeros where legal), dtypes, strides, SIMD levels, thread counts (1 to 4
engine threads) and, in about half the cases, one injected fault that must be
refused with a TypeError / ValueError.  A valid case must match the
reference within its documented tolerance.  With --workers N > 1, N Python
threads run cases at the same time (concurrent calls share the engine's
thread pool and workspace).

    python scripts/fuzz.py --seconds 300 --seed 1 [--workers 2]

Prints the number of cases run (valid / refused) and the failures with their
seeds (reproduce one: `python scripts/fuzz.py --replay moe:SEED`), and exits
non-zero on any failure.  Needs a built extension (the repository root or an
installed dualsparse) and the test dependencies (numpy, torch, pytest).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

import numpy as np  # noqa: E402

import test_fuzz as F  # noqa: E402

KINDS = {"moe": F.moe_example, "route": F.route_example, "importance": F.importance_example}
WEIGHTS = {"moe": 0.6, "route": 0.2, "importance": 0.2}


def run_case(kind: str, seed: int):
    """None for a valid case that matched, "refused" for a refused fault;
    raises on a failure."""
    res = KINDS[kind](seed)
    return None if res is None else "refused"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--seed", type=int, default=0, help="first seed (cases use seed*1_000_003 + i)")
    p.add_argument("--workers", type=int, default=1, help="Python threads running cases at once (default 1)")
    p.add_argument("--max-cases", type=int, default=0, help="stop after this many cases (0: no limit)")
    p.add_argument("--replay", metavar="KIND:SEED", help="run one case (e.g. moe:123) and show its outcome")
    a = p.parse_args(argv)
    if a.replay:
        kind, seed = a.replay.split(":")
        print(run_case(kind, int(seed)) or "valid, matched the reference")
        return 0
    if a.seconds <= 0 or a.workers < 1:
        p.error("--seconds must be > 0 and --workers >= 1")

    kinds = list(WEIGHTS)
    probs = np.array([WEIGHTS[k] for k in kinds])
    lock = threading.Lock()
    counter = [0]
    stats = {"valid": 0, "refused": 0}
    per_kind = {k: 0 for k in kinds}
    failures = []
    deadline = time.monotonic() + a.seconds
    base = a.seed * 1_000_003

    def next_case():
        with lock:
            if time.monotonic() >= deadline or (a.max_cases and counter[0] >= a.max_cases):
                return None
            i = counter[0]
            counter[0] += 1
        rng = np.random.default_rng([a.seed, i])
        return str(rng.choice(kinds, p=probs)), base + i

    def worker():
        while True:
            case = next_case()
            if case is None:
                return
            kind, seed = case
            try:
                outcome = run_case(kind, seed)
            except BaseException as exc:  # every failure is reported with its seed
                with lock:
                    failures.append((kind, seed, f"{type(exc).__name__}: {exc}",
                                     traceback.format_exc(limit=3)))
                continue
            with lock:
                stats["refused" if outcome else "valid"] += 1
                per_kind[kind] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.workers)]
    for t in threads:
        t.start()
    last = t0
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0)
        now = time.monotonic()
        if now - last >= 30:
            last = now
            print(f"  {now - t0:6.0f} s: {counter[0]} cases, {len(failures)} failures", flush=True)
    ran = stats["valid"] + stats["refused"] + len(failures)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"fuzz: {ran} cases in {time.monotonic() - t0:.0f} s (seed {a.seed}, {a.workers} worker(s)): "
          f"{stats['valid']} valid matched the reference, {stats['refused']} faults refused, "
          f"{len(failures)} failures; by kind {per_kind}; load average {load[0]:.1f}")
    for kind, seed, msg, tb in failures[:20]:
        print(f"FAIL {kind}:{seed}: {msg[:500]}\n{tb}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m dualsparse {sweep,info,demo,lm-eval}`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm-eval":   # every later argument is lm-eval's
        from .lm_eval_model import cli

        return cli(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dualsparse", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="version, build flags, SIMD level, threads, CUDA support")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_sweep = sub.add_parser("sweep", help="accuracy and speed of every dropping method at several drop rates "
                                           "(the main job; built-in models by default)",
                             description=_sweep_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    from .sweep import add_arguments as sweep_args

    sweep_args(p_sweep)
    p_demo = sub.add_parser("demo", help="run the engine on a realistic MoE layer and print a table")
    from .demo import add_arguments

    add_arguments(p_demo)
    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line with the 'dualsparse' model type "
                                   "(python -m dualsparse lm-eval --help)")
    args = parser.parse_args(argv)
    if args.cmd == "sweep":
        # torch's OpenMP workers otherwise spin after each torch op and take
        # the cores the engine's threads need (see README, performance)
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .sweep import run as run_sweep

        return run_sweep(args)
    if args.cmd == "info":
        try:
            import torch  # noqa: F401  (thread default follows torch when present)
        except ImportError:
            pass
        from ._info import collect, format_info

        d = collect()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    from .demo import run

    return run(args)


def _sweep_doc():
    from . import sweep

    return sweep.__doc__


if __name__ == "__main__":
    sys.exit(main())

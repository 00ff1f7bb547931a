"""Command line: `python -m dualsparse {info,demo}`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualsparse", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="version, build flags, SIMD level, threads, CUDA support")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_demo = sub.add_parser("demo", help="run the engine on a realistic MoE layer and print a table")
    from .demo import add_arguments

    add_arguments(p_demo)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

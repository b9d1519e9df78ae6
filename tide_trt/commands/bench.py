"""`tide bench NAME [args]`: run benchmarks/NAME.py (each writes JSON) from the repository checkout."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from tide_trt.errors import TideError

REPO = Path(__file__).resolve().parents[2]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (JSON out)")
    p.add_argument("name", help="benchmark module, e.g. bench_engine")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (REPO / "benchmarks" / f"{args.name}.py").is_file():
        available = sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))
        raise TideError(f"no benchmark {args.name!r}; available: {available}")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"benchmarks.{args.name}")
    module.main(args.args)
    return 0

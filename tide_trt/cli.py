"""The `tide` command. Each subcommand lives in tide_trt/commands/<name>.py and exposes `register(sub)`.

Any TideError (bad input, missing file, mismatched checkpoint) is reported as one line on stderr with exit
code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from tide_trt.errors import TideError

COMMANDS = ("generate", "train_draft", "serve", "client", "train", "signals", "drafts", "profile", "bench")

log = logging.getLogger("tide")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, exit 2 (argparse default prints usage too)
        sys.stderr.write(f"tide: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tide", description="TIDE-TRT: self-improving speculative decoding server")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tide_trt.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tide_trt.commands.{name}":
                continue  # command not built into this installation
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except TideError as exc:
        sys.stderr.write(f"tide: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("tide: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

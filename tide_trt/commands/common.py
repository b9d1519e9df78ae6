"""Options and builders shared by subcommands."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

from tide_trt.config import TideConfig, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults: the embedded default model and draft)")
    p.add_argument("--model", help="target model: 'default' or a local Hugging Face Llama checkpoint dir")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads for the engine")
    p.add_argument("--weights", choices=["bf16", "q4_1", "q8_0", "auto"],
                   help="CPU linear weights: bf16, the GGUF file's q4_1 / q8_0 blocks, or auto (what the file holds)")


def config_from_args(args: argparse.Namespace) -> TideConfig:
    """The --config file with --model / --device / --dtype / --threads / --weights applied (validated like the
    YAML)."""
    cfg = load_config(args.config)
    if getattr(args, "model", None):
        cfg = replace(cfg, model=replace(cfg.model, path=args.model))
    engine = {k: getattr(args, a) for k, a in (("device", "device"), ("dtype", "dtype"), ("num_threads", "threads"),
                                                          ("weights", "weights"))
              if getattr(args, a, None)}
    return replace(cfg, engine=replace(cfg.engine, **engine)) if engine else cfg


def command_line() -> str:
    """This process's command line as the user typed it (`tide ...`), for manifests."""
    return "tide " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("tide") else shlex.join(sys.argv)

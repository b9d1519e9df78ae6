"""Options and builders shared by subcommands."""

from __future__ import annotations

import argparse

from tide_trt.config import TideConfig, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults: the embedded default model and draft)")
    p.add_argument("--model", help="target model: 'default' or a local Hugging Face Llama checkpoint dir")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads for the engine")


def config_from_args(args: argparse.Namespace) -> TideConfig:
    cfg = load_config(args.config)
    if getattr(args, "model", None):
        cfg.model.path = args.model
    if getattr(args, "device", None):
        cfg.engine.device = args.device
    if getattr(args, "dtype", None):
        cfg.engine.dtype = args.dtype
    if getattr(args, "threads", None):
        cfg.engine.num_threads = args.threads
    return cfg

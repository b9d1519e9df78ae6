"""`tide train`: the online trainer process (signal store -> training rounds -> versioned draft store)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from dataclasses import replace

from tide_trt.config import TideConfig, load_config
from tide_trt.errors import TideError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the online draft trainer (watches the signal store)")
    p.add_argument("--config", help="YAML config (signals.*, trainer.*, model.*, draft.path are used)")
    p.add_argument("--store", help="signal store directory (default: signals.store_dir)")
    p.add_argument("--drafts", help="draft store directory (default: trainer.drafts_dir)")
    p.add_argument("--model", help="target model: 'default' or a Hugging Face Llama checkpoint dir")
    p.add_argument(
        "--base-draft", help="draft to start from when the draft store is empty (default: draft.path)"
    )
    p.add_argument("--device", help="trainer device (trainer.device), e.g. cpu or cuda:1")
    p.add_argument("--threads", type=int, help="torch threads of the trainer (trainer.num_threads)")
    p.add_argument("--min-new-tokens", type=int, help="N_threshold: new label tokens that start a round")
    p.add_argument("--steps-per-round", type=int, help="optimizer steps cap per round")
    p.add_argument("--poll-seconds", type=float, help="how often to look for new shards")
    p.add_argument("--once", action="store_true", help="run at most one round (if enough data) and exit")
    p.add_argument("--max-rounds", type=int, help="exit after this many rounds")
    p.set_defaults(func=run)


def _apply_overrides(cfg: TideConfig, args: argparse.Namespace) -> TideConfig:
    """cfg with the command-line overrides applied (validated by the config)."""
    overrides = {
        ("signals", "store_dir"): args.store,
        ("trainer", "drafts_dir"): args.drafts,
        ("model", "path"): args.model,
        ("trainer", "device"): args.device,
        ("trainer", "num_threads"): args.threads,
        ("trainer", "min_new_tokens"): args.min_new_tokens,
        ("trainer", "steps_per_round"): args.steps_per_round,
        ("trainer", "poll_seconds"): args.poll_seconds,
    }
    changes: dict[str, dict[str, object]] = {}
    for (section, key), value in overrides.items():
        if value is not None:
            changes.setdefault(section, {})[key] = value
    return replace(cfg, **{section: replace(getattr(cfg, section), **kv) for section, kv in changes.items()})


def _base_draft(cfg, explicit: str | None) -> str | None:
    from tide_trt.runtime import resolve_draft_path

    if explicit:
        return explicit
    try:
        path = resolve_draft_path(cfg.draft.path)
    except TideError as exc:  # the default draft is not installed: fine if the store has versions
        log.debug("no base draft: %s", exc)
        return None
    return str(path) if path else None


def run(args: argparse.Namespace) -> int:
    from tide_trt.online.trainer import OnlineTrainer

    cfg = _apply_overrides(load_config(args.config), args)
    if cfg.trainer.min_new_tokens < 1 or cfg.trainer.steps_per_round < 1:
        raise TideError("--min-new-tokens and --steps-per-round must be >= 1")
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        log.info("signal %d: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    trainer = OnlineTrainer(cfg, base_draft=_base_draft(cfg, args.base_draft), stop=stop)
    log.info(
        "trainer: signals %s -> drafts %s (device %s, %d thread(s), N_threshold %d)",
        cfg.signals.store_dir,
        cfg.trainer.drafts_dir,
        cfg.trainer.device,
        cfg.trainer.num_threads,
        cfg.trainer.min_new_tokens,
    )
    trainer.run(
        once=args.once,
        max_rounds=args.max_rounds,
        on_round=lambda rec: print(json.dumps(rec, sort_keys=True), flush=True),
    )
    return 0

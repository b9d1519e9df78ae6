"""`tide profile`: (re-)measure T(n) and D(b) on this device/dtype/threads and print the cost-model table."""

from __future__ import annotations

import argparse
import json

from tide_trt.commands.common import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="profile target/draft step latency for the adaptive controller")
    add_config_args(p)
    p.add_argument("--draft", help="draft checkpoint dir (default: the shipped draft)")
    p.add_argument("--gamma-max", type=int, default=None)
    p.add_argument("--cached", action="store_true", help="use the cached profile if there is one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tide_trt.online.engine_profile import cached_engine_profile
    from tide_trt.online.profiling import format_profile_table
    from tide_trt.runtime import build_drafter, build_engine, resolve_draft_path

    cfg = config_from_args(args)
    engine = build_engine(cfg)
    draft_path = resolve_draft_path(args.draft or cfg.draft.path)
    drafter = build_drafter(engine, draft_path, cfg.draft.lookup_ngram,
                                  cfg.draft.lookup_gamma) if draft_path else None
    gamma_max = cfg.draft.gamma_max if args.gamma_max is None else args.gamma_max
    profile = cached_engine_profile(engine, drafter, gamma_max, refresh=not args.cached)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        print(format_profile_table(profile))
    return 0

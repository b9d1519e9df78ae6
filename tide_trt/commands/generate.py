"""`tide generate`: one prompt through the engine, plain (ar) or speculative (spec)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from tide_trt.commands.common import add_config_args, config_from_args
from tide_trt.errors import ConfigError, TideError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt")
    add_config_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--mode", choices=["ar", "spec"], default="spec")
    p.add_argument("--draft", help="draft checkpoint dir (default: the shipped draft)")
    p.add_argument("--gamma", type=int, default=None, help="draft length γ (1..draft.gamma_max, default draft.gamma)")
    p.add_argument("--adaptive", action="store_true",
                   help="let the adaptive controller choose γ (0..gamma_max) every step from the profiled cost "
                        "model (the JSON then includes the controller state)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.runtime import (
        TokenDecoder,
        build_drafter_from_config,
        build_engine,
        encode_prompt,
        make_request,
        resolve_draft_path,
        run_to_completion,
        run_with_policy,
    )
    from tide_trt.spec.sampling import SamplingParams

    if not args.prompt.strip():
        raise TideError("prompt is empty")
    if args.max_tokens < 1:
        raise TideError("--max-tokens must be >= 1")
    cfg = config_from_args(args)
    gamma = cfg.draft.gamma if args.gamma is None else args.gamma
    if args.mode == "spec":
        try:
            cfg = replace(cfg, draft=replace(cfg.draft, gamma=gamma))  # the config validates γ ∈ [1, gamma_max]
        except ConfigError:
            raise TideError(f"--gamma must be in [1, {cfg.draft.gamma_max}], got {gamma}") from None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    sampling.validate()
    draft_path = None
    if args.mode == "spec":
        draft_path = resolve_draft_path(args.draft or cfg.draft.path)
        if draft_path is None:
            raise TideError("--mode spec needs a draft (--draft DIR)")
        from tide_trt.draft.checkpoint import read_draft_config

        read_draft_config(draft_path)  # fail fast on an unreadable draft before loading the target
    cfg = replace(cfg, engine=replace(cfg.engine, max_batch_size=1))
    engine = build_engine(cfg)
    drafter = build_drafter_from_config(engine, draft_path, cfg.draft) if draft_path else None
    prompt_ids = encode_prompt(engine.tokenizer, args.prompt, chat=not args.raw)
    gen = SpeculativeGenerator(engine, drafter)
    req = make_request("cli", prompt_ids, args.max_tokens, sampling, engine.info.eos_token_ids)
    controller = None
    if drafter is not None and args.adaptive:
        from tide_trt.online.control_plugin import ControllerPlugin
        from tide_trt.online.engine_profile import cached_engine_profile

        profile = cached_engine_profile(engine, drafter, cfg.draft.gamma_max)
        controller = ControllerPlugin(replace(cfg.controller, mode="adaptive"), profile, cfg.draft.gamma_max, gamma)
    result = run_with_policy(gen, [req], controller, [controller]) if controller else run_to_completion(
        gen, [req], gamma if drafter else 0)
    seq = result.sequences[0]
    ids = seq.output_ids
    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, TokenDecoder), f"{type(tokenizer).__name__} has no decode()"  # narrows `object`
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if args.json:
        out = {
            "text": text, "token_ids": ids, "num_output_tokens": len(ids), "num_prompt_tokens": len(prompt_ids),
            "seconds": result.seconds, "tokens_per_s": len(ids) / result.seconds if result.seconds else 0.0,
            "mean_accepted_len": seq.mean_accepted_len if drafter else 1.0, "mode": args.mode,
            "gamma": gamma if drafter else 0, "finish_reason": seq.finish_reason,
            "acceptance_rate": seq.accepted_tokens / seq.draft_tokens if seq.draft_tokens else 0.0,
            "draft_version": drafter.version if drafter else None,
        }
        if controller is not None:
            out["controller"] = controller.state_dict()
            out["steps_by_gamma"] = controller.steps_by_gamma
        print(json.dumps(out))
    else:
        print(text)
    return 0

"""`tide train-draft`: offline EAGLE-3 training on a workload (recompute path; the static-draft baseline)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from tide_trt.commands.common import add_config_args, command_line, config_from_args
from tide_trt.commands.train_draft_corpus import add_corpus_args, run_corpus
from tide_trt.errors import TideError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-draft", help="train an EAGLE-3 draft offline from a workload")
    add_config_args(p)
    p.add_argument("--workload", choices=["sharegpt", "humaneval"], default="sharegpt")
    p.add_argument("--data", choices=["regenerate", "text", "cached", "corpus"], default="regenerate",
                   help="regenerate: the target answers the workload's prompts and the draft learns its own "
                        "outputs (self-distillation, states captured while generating); text: target prefill over "
                        "the workload's conversation text (recompute path); corpus: target prefill over "
                        "a token corpus of prompt + answer sequences (--corpus), resumable")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length for --data regenerate")
    p.add_argument("--gen-batch", type=int, default=32, help="concurrent sequences for --data regenerate")
    p.add_argument("--num-conversations", type=int, default=400)
    p.add_argument("--max-len", type=int, default=384, help="tokens per conversation (chat template applied)")
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--max-train-seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue training from this draft checkpoint (keeps its vocabulary)")
    p.add_argument("--examples-cache", help="a .safetensors file: reuse the captured training states if it exists, "
                                            "else write them there; a directory (--data regenerate): resumable "
                                            "chunks, each saved when done and reused on the next run")
    p.add_argument("--chunk-conversations", type=int, default=256, help="prompts per chunk in a cache directory")
    p.add_argument("--generate-only", action="store_true", help="stop after the training states are cached")
    p.add_argument("--extra-examples", nargs="+", default=[],
                   help="more cached training states to train on (a .safetensors file or a chunk directory), "
                        "e.g. the --data text cache next to a regenerate one")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    add_corpus_args(p)
    p.set_defaults(func=run)


def _workload_conversations(name: str, n: int, seed: int) -> list:
    from tide_trt import workloads

    if name == "sharegpt":
        return workloads.load_sharegpt(limit=n, seed=seed, split="train")
    tasks = workloads.load_humaneval()[:n]
    turn = workloads.Turn
    return [workloads.Conversation(id=t.task_id, turns=(
        turn("user", workloads.HUMANEVAL_TEMPLATE.format(prompt=t.prompt)),
        turn("assistant", t.prompt + t.canonical_solution))) for t in tasks]


def _prompt_ids(tokenizer, conv, max_len: int) -> list[int]:
    """The conversation's first user turn as a chat prompt (generation prompt appended), or [] if too long."""
    user = next((t.text for t in conv.turns if t.role == "user" and t.text.strip()), None)
    if user is None:
        return []
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                        add_generation_prompt=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    return ids if len(ids) <= max_len else []


def _collect_examples(args: argparse.Namespace, engine) -> tuple[list, list[dict]]:
    """Training examples per --data, read from or written to --examples-cache; returns them and their sources
    (path + the generating command, stored in the safetensors header)."""
    from tide_trt.training.data import (
        cached_examples_metadata,
        encode_conversations,
        load_cached_examples,
        recompute_examples,
        regenerate_chunked,
        regenerate_examples,
        save_examples,
    )

    cache = Path(args.examples_cache) if args.examples_cache else None
    if args.data == "cached" or (cache is not None and cache.is_file()):
        if cache is None:
            raise TideError("--data cached needs --examples-cache (a .safetensors file or a chunk directory)")
        return load_cached_examples(str(cache)), [{"path": str(cache), **cached_examples_metadata(str(cache))}]
    meta = {"command": command_line(), "source": args.data, "workload": args.workload, "max_len": str(args.max_len),
            "max_new_tokens": str(args.max_new_tokens), "model": engine.info.fingerprint,
            "engine": f"{engine.info.dtype if engine.info.weights == 'bf16' else engine.info.weights} weights, "
                      f"native_linears={engine.info.native_linears}"}
    convs = _workload_conversations(args.workload, args.num_conversations, args.seed)
    chunked = cache is not None and args.data == "regenerate" and cache.suffix != ".safetensors"
    if args.data == "text":
        examples = recompute_examples(engine, encode_conversations(engine.tokenizer, convs, args.max_len))
    else:
        seqs = [s for s in (_prompt_ids(engine.tokenizer, c, args.max_len) for c in convs) if s]
        if chunked:
            examples = regenerate_chunked(engine, seqs, args.max_new_tokens, str(cache), args.chunk_conversations,
                                          metadata=meta)
        else:
            examples = regenerate_examples(engine, seqs, args.max_new_tokens)
    if cache is not None and not chunked:
        save_examples(examples, str(cache), meta)
    return examples, [{"path": str(cache) if cache else None, **meta}]


def run(args: argparse.Namespace) -> int:
    import torch

    from tide_trt.draft.checkpoint import save_draft
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.training.data import cached_examples_metadata, load_cached_examples
    from tide_trt.training.offline import TrainSettings, build_vocab_and_head, evaluate_head, train_head

    if args.data == "corpus":
        return run_corpus(args)
    if args.num_conversations < 2 or not 0 < args.eval_fraction < 0.5:
        raise TideError("need --num-conversations >= 2 and 0 < --eval-fraction < 0.5")
    cfg = config_from_args(args)
    cfg = replace(cfg, engine=replace(cfg.engine, max_batch_size=4 if args.data == "text" else args.gen_batch,
                                      max_seq_len=args.max_len + 8 + (args.max_new_tokens
                                                                      if args.data == "regenerate" else 0)))
    torch.manual_seed(args.seed)
    engine = TorchTargetEngine.from_config(cfg.model, cfg.engine)
    t0 = time.time()
    examples, sources = _collect_examples(args, engine)
    if args.generate_only:
        print(json.dumps({"examples": len(examples), "tokens": sum(len(e.tokens) for e in examples),
                          "seconds": time.time() - t0}))
        return 0
    for extra in args.extra_examples:
        examples.extend(load_cached_examples(extra))
        sources.append({"path": extra, **cached_examples_metadata(extra)})
    prefill_s = time.time() - t0
    n_eval = max(1, int(len(examples) * args.eval_fraction))
    held_out, train = examples[:n_eval], examples[n_eval:]
    if args.init:
        from tide_trt.draft.checkpoint import load_draft
        from tide_trt.runtime import resolve_draft_path
        from tide_trt.training.vocab import t2d_from_d2t

        init = resolve_draft_path(args.init)
        if init is None:
            raise TideError("--init needs a draft checkpoint directory or 'default'")
        head, parent = load_draft(init, engine.info, engine.embedding_weight())
        t2d = t2d_from_d2t(head.d2t, engine.info.vocab_size)
        labels = torch.tensor([t for e in train for t in e.labels if t >= 0])
        coverage = float((t2d[labels] >= 0).float().mean()) if labels.numel() else 0.0
    else:
        head, t2d, coverage = build_vocab_and_head(engine, train, args.draft_vocab)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             ttt_steps=args.ttt_steps, seed=args.seed)
    history = train_head(head, train, t2d, settings, max_seconds=args.max_train_seconds)
    report = {g: evaluate_head(head, held_out, t2d, g) for g in (1, 3, 5)}
    manifest = {
        "version": 0, "parent": args.init, "parent_manifest_command": parent.get("command") if args.init else None,
        "trained_by": "tide train-draft (offline, recompute path)",
        "command": command_line(),
        "data": {"workload": args.workload, "source": args.data, "sequences": len(examples), "sources": sources,
                 "max_len": args.max_len, "max_new_tokens": args.max_new_tokens,
                 "train_tokens": history["train_tokens"], "heldout_sequences": n_eval, "seed": args.seed},
        "draft_vocab_coverage": coverage, "ttt_steps": args.ttt_steps, "epochs": args.epochs,
        "prefill_seconds": prefill_s, "train_seconds": history["seconds"],
        "heldout_acceptance": {str(g): r.as_dict() for g, r in report.items()}, "eval_acceptance": report[3].alpha,
        "model_name": engine.info.name, "dtype_of_signals": cfg.engine.dtype,
    }
    head.to(torch.bfloat16)
    out = save_draft(head, args.out, manifest)
    print(json.dumps({"out": str(out), "heldout": report, "coverage": coverage, **history}, indent=2))
    return 0

"""`tide signals ls`: list the signal store (shards, sequences, tokens, size, consumed by the trainer)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TypedDict, final

from tide_trt.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("signals", help="inspect the signal store")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("ls", help="list signal shards")
    ls.add_argument("--config", help="YAML config (signals.store_dir, trainer.drafts_dir)")
    ls.add_argument("--store", help="signal store directory")
    ls.add_argument("--drafts", help="draft store directory (to mark shards consumed by training rounds)")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ls.set_defaults(func=run_ls)


@final  # final: `"error" in row` then tells the two row kinds apart
class _ShardRow(TypedDict):
    shard: str
    sequences: int
    tokens: int
    label_tokens: int
    bytes: int
    dtype: str | None
    created: float
    consumed: bool


@final
class _UnreadableRow(TypedDict):
    shard: str
    error: str
    bytes: int


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def run_ls(args: argparse.Namespace) -> int:
    from tide_trt.online.store import DraftStore, SignalStore

    cfg = load_config(args.config)
    store = SignalStore(args.store or cfg.signals.store_dir)
    drafts = DraftStore(args.drafts or cfg.trainer.drafts_dir)
    consumed: set[str] = set()
    for rnd in drafts.rounds():
        consumed.update(rnd.get("shards", []))
    rows: list[_ShardRow | _UnreadableRow] = []
    for p in store.shard_paths():
        try:
            h = SignalStore.header(p)
        except Exception as exc:  # listing must survive a corrupt shard
            rows.append(_UnreadableRow(shard=p.name, error=str(exc), bytes=p.stat().st_size))
            continue
        rows.append(
            _ShardRow(
                shard=p.name,
                sequences=int(h.get("num_sequences", 0)),
                tokens=int(h.get("num_tokens", 0)),
                label_tokens=int(h.get("num_label_tokens", 0)),
                bytes=p.stat().st_size,
                dtype=h.get("dtype"),
                created=float(h.get("created", 0)),
                consumed=p.name in consumed,
            )
        )
    ok: list[_ShardRow] = [r for r in rows if "error" not in r]
    total = {
        "shards": len(rows),
        "sequences": sum(r["sequences"] for r in ok),
        "tokens": sum(r["tokens"] for r in ok),
        "label_tokens": sum(r["label_tokens"] for r in ok),
        "bytes": sum(r["bytes"] for r in rows),
        "pending_label_tokens": sum(r["label_tokens"] for r in ok if not r["consumed"]),
    }
    if args.json:
        print(json.dumps({"store": str(store.root), "shards": rows, "total": total}, indent=2))
        return 0
    print(f"signal store {Path(store.root)}")
    print(f"{'shard':<52} {'seqs':>5} {'tokens':>8} {'labels':>8} {'size':>10} {'created':>19}  consumed")
    for r in rows:
        if "error" in r:
            print(f"{r['shard']:<52} unreadable: {r['error']}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        print(
            f"{r['shard']:<52} {r['sequences']:>5} {r['tokens']:>8} {r['label_tokens']:>8} "
            f"{_mb(r['bytes']):>10} "
            f"{created:>19}  {'yes' if r['consumed'] else 'no'}"
        )
    print(
        f"total: {total['shards']} shards, {total['sequences']} sequences, {total['tokens']} tokens "
        f"({total['label_tokens']} label tokens), {_mb(total['bytes'])}; "
        f"not yet trained on: {total['pending_label_tokens']} label tokens"
    )
    return 0

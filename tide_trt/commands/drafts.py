"""`tide drafts ls` (shipped drafts; the store's versions, sizes, acceptance history);
`tide drafts use VERSION|latest` (pin, unpin)."""

from __future__ import annotations

import argparse
import json
import time

from tide_trt.config import load_config
from tide_trt.errors import TideError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drafts", help="inspect the draft store, pin a version (rollback)")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("ls", help="list published draft versions and training rounds")
    ls.add_argument("--config", help="YAML config (trainer.drafts_dir)")
    ls.add_argument("--drafts", help="draft store directory")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ls.set_defaults(func=run_ls)
    use = verbs.add_parser("use", help="serve VERSION from now on (pin), or 'latest' to follow new versions")
    use.add_argument("version", help="a published version number, or 'latest'")
    use.add_argument("--config", help="YAML config (trainer.drafts_dir)")
    use.add_argument("--drafts", help="draft store directory")
    use.set_defaults(func=run_use)


def _store(args: argparse.Namespace):
    from tide_trt.online.store import DraftStore

    return DraftStore(args.drafts or load_config(args.config).trainer.drafts_dir)


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def shipped_rows() -> list[dict]:
    """The released drafts in the package (name, default or not, size, held-out τ at γ = 3, training data)."""
    from tide_trt.draft.checkpoint import read_draft_config
    from tide_trt.online.store import dir_bytes
    from tide_trt.runtime import DEFAULT_DRAFT, shipped_drafts

    rows = []
    for name, path in shipped_drafts().items():
        _, manifest = read_draft_config(path)
        held = manifest.get("heldout_acceptance", {}).get("3", {})
        data = manifest.get("data", {})
        rows.append({"name": name, "default": name == DEFAULT_DRAFT, "path": str(path), "bytes": dir_bytes(path),
                     "heldout_tau_gamma3": held.get("tau"),
                     "distinct_train_tokens": data.get("corpus_positions", data.get("train_tokens")),
                     "command": manifest.get("command")})
    return rows


def run_ls(args: argparse.Namespace) -> int:
    from tide_trt.online.store import dir_bytes, read_jsonl

    shipped = shipped_rows()

    store = _store(args)
    live = set(store.versions())
    cur, pin, latest = store.current(), store.pinned(), store.latest()
    rows = []
    for e in read_jsonl(store.manifest_path):
        v = e.get("version")
        present = v in live
        rows.append(
            {
                **e,
                "present": present,
                "bytes": dir_bytes(store.version_dir(v)) if present else 0,
                "current": v == cur,
                "pinned": v == pin,
                "latest": v == latest,
            }
        )
    rounds = store.rounds()
    summary = {
        "rounds": len(rounds),
        "deployed": sum(1 for r in rounds if r.get("deploy")),
        "last_reason": rounds[-1].get("reason") if rounds else None,
    }
    if args.json:
        print(
            json.dumps(
                {
                    "drafts": str(store.root),
                    "current": cur,
                    "pinned": pin,
                    "latest": latest,
                    "versions": rows,
                    "rounds": summary,
                    "shipped": shipped,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    print("shipped drafts (draft.path: <name>; 'default' serves the one marked):")
    print(f"{'name':>7} {'size':>9} {'held-out τ(γ=3)*':>17} {'data tokens':>11}  default")
    for r in shipped:
        tokens = f"{r['distinct_train_tokens'] / 1e6:.2f}M" if r["distinct_train_tokens"] else "-"
        print(f"{r['name']:>7} {r['bytes'] / 1e6:>6.2f} MB {_fmt(r['heldout_tau_gamma3']):>17} {tokens:>11}  "
              f"{'yes' if r['default'] else ''}")
    print("  * simulated, on the held-out set of each draft's own training data (compare drafts with "
          "`tide bench bench_engine --drafts NAME NAME`)")
    print(f"draft store {store.root}: current {cur} ({'pinned' if pin is not None else 'latest'})")
    print(
        f"{'version':>7} {'parent':>6} {'size':>9} {'eval acc':>8} {'served':>7} {'gain':>7} "
        f"{'created':>19}  state"
    )
    for r in rows:
        state = ",".join(k for k in ("current", "pinned", "latest") if r[k]) or (
            "" if r["present"] else "pruned"
        )
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("time", 0))))
        size = f"{r['bytes'] / 1e6:.2f} MB" if r["present"] else "-"
        parent = "-" if r.get("parent") is None else str(r["parent"])
        print(
            f"{r['version']:>7} {parent:>6} {size:>9} {_fmt(r.get('eval_acceptance')):>8} "
            f"{_fmt(r.get('served_acceptance')):>7} {_fmt(r.get('gain')):>7} {created:>19}  {state}"
        )
    print(
        f"training rounds: {summary['rounds']} ({summary['deployed']} deployed); "
        f"last: {summary['last_reason']}"
    )
    return 0


def run_use(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.version == "latest":
        store.unpin()
        print(f"serving follows the latest version ({store.latest()})")
        return 0
    try:
        version = int(args.version.lstrip("v"))
    except ValueError as exc:
        raise TideError(f"VERSION must be a number or 'latest', got {args.version!r}") from exc
    store.pin(version)
    print(f"serving pinned to version {version} (running servers switch at their next poll)")
    return 0

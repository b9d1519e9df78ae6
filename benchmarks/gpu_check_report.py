"""GPU check, reporting: the wall-clock budget, the result document (rewritten after every part), the issue-13
floors judged from its numbers, the verdict (exit code) and the human-readable summary."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# issue 13 floors (H200, bf16, default model + shipped draft): only judged on CUDA with the default model
FLOORS = {"bs1_plain_tokens_per_s": 600.0, "bs1_spec_vs_plain": 1.5, "bs64_plain_tokens_per_s": 20000.0}


# ---- budget, result document ---------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole run (model loading included)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0.0


class Report:
    """The result document; rewritten (atomically) after every part."""

    def __init__(self, out: str | Path, budget: Budget, data: dict[str, Any]) -> None:
        self.out = Path(out)
        self.budget = budget
        self.data = data
        data.setdefault("skipped", [])
        data.setdefault("errors", [])

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed(), 3)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".gpu_check-", suffix=".json", dir=self.out.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.out)

    def skip(self, name: str, reason: str) -> None:
        log.warning("skipped %s: %s", name, reason)
        self.data["skipped"].append({"part": name, "reason": reason})

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one part unless the budget is spent; an exception is recorded (with its traceback), not raised,
        so one broken part does not cost the others' numbers."""
        if self.budget.expired():
            self.skip(name, f"budget of {self.budget.seconds:.0f} s spent ({self.budget.elapsed():.0f} s elapsed)")
            self.save()
            return None
        t0 = time.perf_counter()
        log.info("gpu_check: %s (%.0f s left)", name, self.budget.left())
        try:
            return fn()
        except Exception as exc:  # recorded in the JSON; the exit code says so
            log.exception("gpu_check: %s failed", name)
            self.data["errors"].append({"part": name, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc(limit=12)})
            return None
        finally:
            log.info("gpu_check: %s took %.1f s", name, time.perf_counter() - t0)
            self.save()


def floors(result: dict[str, Any], applies: bool) -> dict[str, Any]:
    """The issue-13 floors from this run's numbers (bf16, graphs on), judged only on CUDA with the default
    model and draft."""
    tp = result.get("throughput", {}).get("bfloat16/graphs_on", {})
    bs1, bs64 = tp.get("bs1") or {}, tp.get("bs64") or {}
    checks: dict[str, Any] = {"applies": applies}

    def put(name: str, value: float | None, floor: float) -> None:
        checks[name] = {"value": value, "floor": floor, "passed": None if value is None else value >= floor}

    put("bs1_plain_tokens_per_s", (bs1.get("plain") or {}).get("tokens_per_s"), FLOORS["bs1_plain_tokens_per_s"])
    put("bs1_spec_vs_plain", bs1.get("spec_vs_plain"), FLOORS["bs1_spec_vs_plain"])
    put("bs64_plain_tokens_per_s", (bs64.get("plain") or {}).get("tokens_per_s"), FLOORS["bs64_plain_tokens_per_s"])
    lossless = result.get("lossless", {})
    checks["lossless_all_identical"] = {
        "configs": {k: f"{v['identical']}/{v['total']}" for k, v in lossless.items()},
        "passed": bool(lossless) and all(v["passed"] for v in lossless.values()),
    }
    return checks


# ---- verdict --------------------------------------------------------------------------------------------------------
def verdict(data: dict[str, Any]) -> dict[str, Any]:
    """What the run says: lossless comparisons that found differing outputs (a correctness failure), parts that
    raised, and floors missed (reported; judged only where `floors.applies`)."""
    lossless = data.get("lossless") or {}
    fl = data.get("floors") or {}
    missed = [k for k, v in fl.items() if isinstance(v, dict) and v.get("passed") is False
              and k != "lossless_all_identical"] if fl.get("applies") else []
    out = {"lossless_failed": sorted(name for name, row in lossless.items() if not row["passed"]),
           "errors": [e["part"] for e in data.get("errors", [])], "floors_missed": missed}
    out["exit_code"] = 1 if out["lossless_failed"] or out["errors"] else 0
    return out


def exit_code(data: dict[str, Any]) -> int:
    """0: every lossless comparison identical and no part raised; 1 otherwise. Missed floors do not fail."""
    return int(verdict(data)["exit_code"])


# ---- human-readable summary ---------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_text(data: dict[str, Any]) -> str:
    """Markdown tables of one result document (what the run prints at the end)."""
    lines = [f"## gpu_check: {data.get('model', {}).get('name', '?')} on {data['device']} "
             f"({data['machine'].get('cuda') or data['machine'].get('cpu')}), {data['elapsed_s']:.0f} s", ""]
    if data["lossless"]:
        lines += ["| lossless | identical | τ | drafted | accepted |", "|---|---|---|---|---|"]
        for name, row in data["lossless"].items():
            lines.append(f"| {name} | {row['identical']}/{row['total']} | {_fmt(row['tau'], '.2f')} | "
                         f"{row['drafted']} | {row['accepted']} |")
        lines.append("")
    if any(data["throughput"].values()):
        lines += ["| engine | batch | plain tok/s | spec tok/s (τ) | HF tok/s | spec/plain | plain/HF | ms/step "
                  "| sampled plain tok/s | sampled spec tok/s (τ) | sampled spec/plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, table in data["throughput"].items():
            for bs, row in table.items():
                hf = row.get("hf_generate") or {}
                ps, ss = row.get("plain_sampled") or {}, row.get("spec_sampled") or {}
                lines.append(
                    f"| {name} | {bs[2:]} | {_fmt(row['plain']['tokens_per_s'])} | "
                    f"{_fmt(row['spec']['tokens_per_s'])} ({_fmt(row['spec']['tau'], '.2f')}) | "
                    f"{_fmt(hf.get('tokens_per_s'))} | {_fmt(row.get('spec_vs_plain'), '.2f')} | "
                    f"{_fmt(row.get('plain_vs_hf'), '.2f')} | {_fmt(row['plain']['ms_per_step'], '.2f')} | "
                    f"{_fmt(ps.get('tokens_per_s'))} | {_fmt(ss.get('tokens_per_s'))} ({_fmt(ss.get('tau'), '.2f')}) | "
                    f"{_fmt(row.get('spec_vs_plain_sampled'), '.2f')} |")
        lines.append("")
    for name, table in data["step_breakdown"].items():
        if not table:
            continue
        lines += [f"step breakdown ({name}), ms per decode step:", "",
                  "| batch | mode | step | target forward | draft | rest |", "|---|---|---|---|---|---|"]
        for bs, row in table.items():
            for mode in ("plain", "spec", "spec_sampled"):
                r = row.get(mode) or {}
                lines.append(f"| {bs[2:]} | {mode} | {_fmt(r.get('step_ms'), '.2f')} | "
                             f"{_fmt(r.get('target_forward_ms'), '.2f')} | {_fmt(r.get('draft_ms'), '.2f')} | "
                             f"{_fmt(r.get('rest_ms'), '.2f')} |")
        lines.append("")
    if data.get("profile"):
        lines += ["```", data["profile"]["table"], "```", ""]
    fl = data.get("floors", {})
    if fl.get("applies"):
        lines.append("floors: " + ", ".join(f"{k} {'ok' if v.get('passed') else 'MISSED'}"
                                            for k, v in fl.items() if isinstance(v, dict)))
    v = data.get("verdict") or verdict(data)
    if v["lossless_failed"]:
        lines.append(f"FAILED: greedy speculative output differs from plain in {', '.join(v['lossless_failed'])}")
    if v["floors_missed"]:
        lines.append(f"floors missed (reported, not a failure): {', '.join(v['floors_missed'])}")
    for s in data["skipped"]:
        lines.append(f"skipped: {s['part']} ({s['reason']})")
    for e in data["errors"]:
        lines.append(f"ERROR in {e['part']}: {e['error']}")
    return "\n".join(lines) + "\n"

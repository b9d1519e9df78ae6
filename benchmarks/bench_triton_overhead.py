"""Triton overhead: throughput through a real tritonserver vs the in-process engine, in ONE run.

Both sides run the same scheduler code path (`TideService` built by `build_service(cfg)`: same engine
config, same γ policy), the same ShareGPT prompts, greedy, `--max-tokens` each, closed loop at each
concurrency:
  * in-process: a worker process (`--worker`) holding a TideService, driven by `loadgen.run_inprocess`;
  * Triton: `model_repo/tide` in a tritonserver started here, driven over gRPC by `loadgen.run_grpc`.
The worker and the server each run in their own session, so on a shared machine with scheduler
autogrouping both engines get the same CPU share (an in-process engine inside this process would share
the benchmark's session and be starved relative to the server). The sides alternate their order per
round; `--repeats` rounds per concurrency, the median throughput of each side is compared (the pooled
estimate), next to the median of the per-round ratios (the paired estimate: the two sides of a round ran
back to back, so the VM's slow speed drift cancels). Each Triton run also records the CPU seconds of
`tritonserver` itself, of the Python-backend stub (engine + scheduler) and of the client: the server and
client share of all CPU time is what Triton adds on a machine where they compete with the engine for cores.

Floor: Triton overhead = 1 - triton_throughput / inprocess_throughput <= 10 % at every concurrency.

    python benchmarks/bench_triton_overhead.py --config configs/serve_cpu.yaml \
        --concurrency 1 8 32 --out runs/bench_triton_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import load_prompts, run_grpc, run_inprocess, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_triton_overhead")
FLOOR = 0.10


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Triton vs in-process throughput (same scheduler, same requests)")
    p.add_argument("--config", default=str(ROOT / "configs" / "serve_cpu.yaml"))
    p.add_argument("--draft", help="override draft.path ('none' = plain decoding)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-requests", type=int, default=0, help="per level; 0 = max(8, 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="rounds per concurrency (median is compared)")
    p.add_argument("--workload", choices=["sharegpt", "humaneval"], default="sharegpt")
    p.add_argument("--max-prompt-chars", type=int, default=1200, help="ShareGPT prompts longer are skipped")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_triton_overhead.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run the in-process worker on this config
    return p.parse_args(argv)


def _prompts(args: argparse.Namespace, n: int) -> list[str]:
    if args.workload == "sharegpt":
        from tide_trt import workloads

        return workloads.sharegpt_prompts(n, max_chars=args.max_prompt_chars)
    return load_prompts(args.workload, n)


def _machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()}  # fmt: skip


# ---- the in-process side: a worker process speaking JSON lines -----------------------------------
def worker_main(config_path: str) -> int:
    """Hold a TideService; for each stdin line {prompts, concurrency, max_tokens} print {summary, texts}."""
    from tide_trt.config import load_config
    from tide_trt.serving.service import TideService

    service = TideService.from_config(load_config(config_path)).start()
    out = sys.stdout
    sys.stdout = sys.stderr  # only protocol lines on the real stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("quit"):
                break
            records, wall = run_inprocess(service, cmd["prompts"], cmd["concurrency"], cmd["max_tokens"])
            out.write(json.dumps({"summary": summarize(records, wall), "texts": [r.text for r in records]}) + "\n")
            out.flush()
    finally:
        service.stop()
    return 0


class InProcessWorker:
    def __init__(self, config_path: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(config_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        if self._read().get("ready") is not True:
            raise RuntimeError("in-process worker failed to start")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"in-process worker exited (code {self.proc.poll()})")
        return json.loads(line)

    def run(self, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[dict[str, Any], list[str]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "concurrency": concurrency,
                                          "max_tokens": max_tokens}) + "\n")  # fmt: skip
        self.proc.stdin.flush()
        reply = self._read()
        return reply["summary"], reply["texts"]

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# ---- one concurrency level ---------------------------------------------------------------------------
def _cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of tritonserver, its Python-backend stub(s) and this client."""
    import psutil

    from tide_trt.serving.tritonserver import group_members

    out = {"tritonserver": 0.0, "stub": 0.0, "client": 0.0}
    for proc in group_members(server_pid):
        try:
            times = proc.cpu_times()
            out["stub" if "stub" in proc.name() else "tritonserver"] += times.user + times.system
        except psutil.Error:
            continue
    me = psutil.Process().cpu_times()
    out["client"] = me.user + me.system
    return out


def _triton_run(url: str, server_pid: int, prompts: list[str], c: int, max_tokens: int
                ) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    before = _cpu_seconds(server_pid)
    records, wall = run_grpc(url, prompts, c, max_tokens)
    after = _cpu_seconds(server_pid)
    cpu = {k: after[k] - before[k] for k in before}
    total = sum(cpu.values())
    summary = summarize(records, wall)
    summary["cpu_seconds"] = cpu
    summary["server_client_cpu_share"] = (cpu["tritonserver"] + cpu["client"]) / total if total else 0.0
    return summary, [rec.text for rec in records]


def _level(worker: InProcessWorker, url: str, server_pid: int, prompts: list[str], c: int, max_tokens: int,
           repeats: int, first_round: int) -> dict[str, Any]:  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"inprocess": [], "triton": []}
    texts: dict[str, list[str]] = {}
    for r in range(repeats):
        triton_first = (first_round + r) % 2 == 1
        for side in ("triton", "inprocess") if triton_first else ("inprocess", "triton"):
            t0 = time.time()
            if side == "triton":
                summary, texts[side] = _triton_run(url, server_pid, prompts, c, max_tokens)
            else:
                summary, texts[side] = worker.run(prompts, c, max_tokens)
            summary["first"] = triton_first == (side == "triton")
            runs[side].append(summary)
            log.info("c=%d %s: %.1f tok/s (%.0f s)", c, side, summary["throughput_tok_s"], time.time() - t0)
    med = {side: statistics.median(s["throughput_tok_s"] for s in rs) for side, rs in runs.items()}
    ratio = med["triton"] / max(med["inprocess"], 1e-9)
    paired = [t["throughput_tok_s"] / max(i["throughput_tok_s"], 1e-9)
              for t, i in zip(runs["triton"], runs["inprocess"], strict=True)]  # fmt: skip
    share = statistics.median(t["server_client_cpu_share"] for t in runs["triton"])
    same = sum(a == b for a, b in zip(texts["triton"], texts["inprocess"], strict=True))
    return {"concurrency": c, "requests": len(prompts), "triton_tok_s": med["triton"],
            "inprocess_tok_s": med["inprocess"], "throughput_ratio": ratio, "overhead": 1.0 - ratio,
            "pass": 1.0 - ratio <= FLOOR, "paired_ratios": paired,
            "paired_overhead": 1.0 - statistics.median(paired), "server_client_cpu_share": share,
            "identical_texts": same, "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        return worker_main(args.worker)
    from tide_trt.config import config_to_dict, load_config
    from tide_trt.serving.tritonserver import TritonServer, find_tritonserver, free_ports

    cfg = load_config(args.config)
    if args.draft:
        cfg = replace(cfg, draft=replace(cfg.draft, path=args.draft))
    cfg = replace(
        cfg,
        engine=replace(cfg.engine, max_batch_size=max(cfg.engine.max_batch_size, *args.concurrency)),
        serving=replace(cfg.serving, max_queue=max(cfg.serving.max_queue, 2 * max(args.concurrency)),
                        max_tokens_limit=max(cfg.serving.max_tokens_limit, args.max_tokens)),
    )
    levels = {c: args.num_requests or max(8, 2 * c) for c in args.concurrency}
    prompts = _prompts(args, max(levels.values()))
    report: dict[str, Any] = {
        "machine": _machine(), "config": config_to_dict(cfg), "max_tokens": args.max_tokens,
        "workload": args.workload, "repeats": args.repeats, "floor_overhead": FLOOR, "levels": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tide-bench-") as tmp:
        cfg_path = Path(tmp) / "tide.yaml"
        cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
        http, grpc, metrics = free_ports(3)
        install = find_tritonserver(cfg.serving.tritonserver)
        env = {"TIDE_CONFIG": str(cfg_path)}
        with TritonServer(ROOT / "model_repo", install, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          env=env) as server:  # fmt: skip
            worker = InProcessWorker(cfg_path)
            try:
                worker.run(prompts[:2], 2, 8)  # warm-up both sides (first-call allocations, thread pools)
                run_grpc(server.urls.grpc, prompts[:2], 2, 8)
                assert server.pid is not None
                for i, c in enumerate(args.concurrency):
                    level = _level(worker, server.urls.grpc, server.pid, prompts[: levels[c]], c,
                                   args.max_tokens, args.repeats, i)  # fmt: skip
                    report["levels"].append(level)
            finally:
                worker.close()
    report["all_pass"] = all(lv["pass"] for lv in report["levels"])
    report["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    keys = ("concurrency", "triton_tok_s", "inprocess_tok_s", "throughput_ratio", "overhead", "pass",
            "paired_overhead", "server_client_cpu_share", "identical_texts")  # fmt: skip
    levels_out = [{k: lv[k] for k in keys} for lv in report["levels"]]
    print(json.dumps({"out": args.out, "all_pass": report["all_pass"], "levels": levels_out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

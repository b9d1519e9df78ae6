"""Host time of one engine step, split into its phases: plan → propose → forward → verify → commit.

The target forward and the draft head's layer are compute; everything else a step does — planning rows, building
the step batch, gathering draft inputs, verification's bookkeeping, the commit — is host-side Python and small
tensor work that a GPU does not hide. This benchmark runs the default model (greedy ShareGPT eval prompts) at a
fixed batch size and γ and times every phase of every step in the main thread's **CPU time** (`time.thread_time`:
what the host-side Python costs, insensitive to other processes on a shared machine) and wall time, with the
target forward and the draft head's layers (`Eagle3Head.step` / `greedy_chain` / `fuse`) measured on their own and
subtracted from the phase they run in. host = step − forward − draft compute.

    tide bench bench_step_host --batch-size 8 --gamma 3 --max-new-tokens 64 --out runs/bench_step_host.json

Systems side by side (same prompts, greedy, so every system runs the same tokens on every run): `plain` (γ = 0),
`head` (the shipped EAGLE-3 head alone), `hybrid` (head + suffix index, the serving default).
The phase split follows the generator's own methods (the generator before and after issue 19 has different ones;
both are listed in PHASES), so one harness measures both.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)

# phase -> the methods whose time it is (owner attribute path on the generator, method name); missing ones are
# skipped, so one table covers the generator before and after issue 19
PHASES: dict[str, list[tuple[str, str]]] = {
    "plan": [("", "_row_gammas"), ("", "_plan"), ("step_batch", "build")],
    "propose": [("", "_propose"), ("drafter", "draft")],
    "forward": [("engine", "forward_step")],
    "draft_compute": [("drafter.head", "step"), ("drafter.head", "greedy_chain"), ("drafter.head", "fuse")],
    "verify": [("generator_module", "mixed_verify"), ("", "_verify")],
    "commit": [("", "_commit_step"), ("", "_commit_rows"), ("drafter", "observe")],
}
COMPUTE = ("forward", "draft_compute")


class PhaseClock:
    """Exclusive time per phase (a nested phase's time is not counted again in the one it runs inside)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open phase: [child cpu, child wall]

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0, 0.0])
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dc, dw = time.thread_time() - c0, time.perf_counter() - w0
                child_c, child_w = self._stack.pop()
                self.cpu[phase] += dc - child_c
                self.wall[phase] += dw - child_w
                if self._stack:
                    self._stack[-1][0] += dc
                    self._stack[-1][1] += dw

        return timed


def _owner(gen: Any, path: str) -> Any:
    if path == "step_batch":
        from tide_trt.engine import step_batch

        return step_batch.StepBatch
    if path == "generator_module":
        from tide_trt.engine import generator

        return generator
    obj = gen
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def instrument(gen: Any, clock: PhaseClock) -> list[tuple[Any, str, Any]]:
    """Wrap every phase method that exists; returns what to restore (owner, name, original or None for an
    instance attribute that shadows its class's method)."""
    undo: list[tuple[Any, str, Any]] = []
    for phase, targets in [*PHASES.items(), ("step_other", [("", "step")])]:
        for path, name in targets:
            owner = _owner(gen, path)
            if owner is None or not hasattr(owner, name):
                continue
            if isinstance(owner, type):  # a classmethod (StepBatch.build)
                original = owner.__dict__[name]
                setattr(owner, name, classmethod(clock.wrap(phase, original.__func__)))
                undo.append((owner, name, original))
            elif type(owner).__name__ == "module":
                original = getattr(owner, name)
                setattr(owner, name, clock.wrap(phase, original))
                undo.append((owner, name, original))
            else:  # a bound method: shadowed on the instance
                setattr(owner, name, clock.wrap(phase, getattr(owner, name)))
                undo.append((owner, name, None))
    return undo


def restore(undo: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in reversed(undo):
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def run_system(engine: Any, drafter: Any, prompts: list[list[int]], gamma: int, max_new: int,
               warmup_steps: int) -> dict:
    from tide_trt.draft.suffix import build_suffix_drafter
    from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator

    if drafter is not None and drafter.suffix is not None:  # a fresh global index: no answers to these prompts in it
        drafter.suffix = build_suffix_drafter(drafter.suffix.config, engine.info.max_batch_size,
                                              engine.info.max_seq_len)
    gen = SpeculativeGenerator(engine, drafter)
    for j, p in enumerate(prompts):
        gen.add(GenerationRequest(f"r{j}", p, max_new))
    while any(not s.prefilled for s in gen.sequences.values()):  # prefill: not what this benchmark measures
        gen.step(gamma)
    for _ in range(warmup_steps):
        gen.step(gamma)
    clock = PhaseClock()
    undo = instrument(gen, clock)
    steps = tokens = 0
    try:
        while any(not s.finished for s in gen.sequences.values()):
            events = gen.step(gamma)
            steps += 1
            tokens += sum(len(ev.new_token_ids) for ev in events)
    finally:
        restore(undo)
    for rid in sorted(gen.sequences, key=lambda r: -gen.sequences[r].slot):
        gen.release(rid)
    if drafter is not None:
        for s in range(engine.info.max_batch_size):
            drafter.reset_slot(s)

    def per_step(d: dict[str, float]) -> dict[str, float]:
        out = {k: 1e3 * v / steps for k, v in sorted(d.items())}
        out["host"] = sum(v for k, v in out.items() if k not in COMPUTE)
        out["total"] = sum(v for k, v in out.items() if k != "host")
        return out

    return {"steps": steps, "tokens": tokens, "tau": tokens / steps,
            "cpu_ms_per_step": per_step(clock.cpu), "wall_ms_per_step": per_step(clock.wall)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_step_host")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompts cut to their last N tokens")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs per system (the table keeps the lowest host time)")
    p.add_argument("--systems", nargs="+", choices=["plain", "head", "hybrid"], default=["plain", "head", "hybrid"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine default); 1 keeps a busy "
                   "machine's idle-waiting worker threads out of the host phases' CPU time")
    p.add_argument("--label", default="", help="a name for this code version in the JSON (e.g. before / after)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import EngineConfig, ModelConfig, SuffixConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.runtime import DEFAULT_DRAFT_DIR, build_drafter, encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    engine = TorchTargetEngine.from_config(ModelConfig(), EngineConfig(
        num_threads=args.threads, dtype=args.dtype, max_batch_size=args.batch_size,
        max_seq_len=args.prompt_tokens + args.max_new_tokens + 16))
    texts = sharegpt_prompts(args.batch_size, seed=1234)
    prompts = [encode_prompt(engine.tokenizer, t)[-args.prompt_tokens:] for t in texts]
    systems: dict[str, tuple[Any, int]] = {}
    for name in args.systems:
        if name == "plain":
            systems[name] = (None, 0)
        elif name == "head":
            systems[name] = (build_drafter(engine, DEFAULT_DRAFT_DIR), args.gamma)
        else:
            systems[name] = (build_drafter(engine, DEFAULT_DRAFT_DIR, suffix=SuffixConfig()), args.gamma)
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):  # systems take turns, so a slow spell of a shared machine hits all of them
        for name, (drafter, gamma) in systems.items():
            r = run_system(engine, drafter, prompts, gamma, args.max_new_tokens, args.warmup_steps)
            log.info("%s: host %.2f ms/step CPU (%s)", name, r["cpu_ms_per_step"]["host"],
                     ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_step"].items()))
            if name not in runs or r["cpu_ms_per_step"]["host"] < runs[name]["cpu_ms_per_step"]["host"]:
                runs[name] = r
    result = {"benchmark": "step_host", "label": args.label, "machine": machine(), "model": engine.info.name,
              "dtype": args.dtype, "native_linears": engine.info.native_linears, "batch_size": args.batch_size,
              "gamma": args.gamma, "max_new_tokens": args.max_new_tokens, "prompt_tokens": args.prompt_tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "runs": runs}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

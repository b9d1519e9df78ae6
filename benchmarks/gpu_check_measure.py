"""GPU check, measuring: the engine variants (`Rig`), running requests through the generator, and the four
measurements — lossless comparison, throughput (greedy and sampled, plain and speculative, HF `generate` beside
them), the `tide profile` table, the per-step time breakdown. Each returns a JSON-ready dict; judging and
printing them is `gpu_check_report`'s job, ordering and budgeting them `gpu_check`'s."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check_report import Budget

log = logging.getLogger(__name__)


def cycled(prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """The first `n` prompts, repeating the set when there are fewer."""
    return [list(prompts[i % len(prompts)]) for i in range(n)]


# ---- engines ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for the device (never inside a CUDA graph capture, where a sync is an error)."""
    if device.startswith("cuda") and not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()


def engine_config(args: argparse.Namespace, dtype: str, graphs: bool, max_batch_size: int, max_seq_len: int):
    """EngineConfig for one variant, and what was asked of it. A switch this EngineConfig does not have is
    reported (not silently dropped): the check then measures an engine without it."""
    from tide_trt.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    want: dict[str, Any] = {"device": args.device, "dtype": dtype, "max_batch_size": max_batch_size,
                            "max_seq_len": max_seq_len, "cpu_kernels": args.cpu_kernels, "cuda_graphs": graphs}
    if args.batch_invariant != "default":
        want["batch_invariant"] = args.batch_invariant
    if args.max_num_tokens:
        want["max_num_tokens"] = args.max_num_tokens
    if args.threads:
        want["num_threads"] = args.threads
    cfg = EngineConfig(**{k: v for k, v in want.items() if k in known})
    effective = {k: getattr(cfg, k) for k in ("dtype", "cuda_graphs", "batch_invariant", "max_num_tokens",
                                              "cpu_kernels", "max_batch_size", "max_seq_len") if k in known}
    return cfg, {"effective": effective, "unsupported_switches": sorted(set(want) - known)}


@dataclass
class Rig:
    """One engine variant with its drafter and two reusable generators (plain, speculative)."""

    name: str
    engine: Any
    drafter: Any
    plain: Any
    spec: Any
    config: dict[str, Any]

    @property
    def eos(self) -> tuple[int, ...]:
        return tuple(self.engine.info.eos_token_ids)


class Models:
    """The target checkpoint (loaded once), its tokenizer, and how each engine variant gets its draft."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from tide_trt.models.loader import load_checkpoint, load_tokenizer

        self.args = args
        self.draft_head = None  # tiny mode: trained once here, shared by every variant
        if args.tiny:
            from tide_trt.models.tiny import write_tiny_llama

            # vocabulary 256: the profiler draws context ids from [100, vocab)
            self.ckpt = load_checkpoint(str(write_tiny_llama(workdir / "tiny-llama", seed=0, vocab_size=256)))
            self.tokenizer = None
        else:
            self.ckpt = load_checkpoint(args.model)
            self.tokenizer = load_tokenizer(self.ckpt.path)
        self.max_seq_len = args.max_prompt_tokens + max(args.max_new_tokens, args.lossless_max_new_tokens) \
            + args.gamma + 16
        self.max_batch_size = max([*args.batch_sizes, args.lossless_batch_size, *args.profile_batch_sizes,
                                   *args.breakdown_batch_sizes])

    def build(self, dtype: str, graphs: bool) -> Rig:
        from tide_trt.draft.drafter import ChainDrafter
        from tide_trt.engine.generator import SpeculativeGenerator
        from tide_trt.engine.torch_engine import TorchTargetEngine

        cfg, config = engine_config(self.args, dtype, graphs, self.max_batch_size, self.max_seq_len)
        t0 = time.perf_counter()
        # CUDA graphs cover the largest verification this run makes (the profile's γ included)
        gamma_max = max(self.args.gamma, self.args.profile_gamma_max)
        engine = TorchTargetEngine(self.ckpt, cfg, self.tokenizer, gamma_max=gamma_max)
        config["gamma_max"] = gamma_max
        config["graph_max_tokens"] = engine.graph_max_tokens
        if self.args.tiny:
            if self.draft_head is None:
                self.draft_head = train_tiny_head(self.ckpt, self.args)
            drafter = ChainDrafter.for_engine(self.draft_head, engine.info)
        else:
            from tide_trt.runtime import build_drafter, resolve_draft_path

            drafter = build_drafter(engine, resolve_draft_path(self.args.draft))
        config["build_s"] = round(time.perf_counter() - t0, 3)
        config["native_linears"] = bool(engine.info.native_linears)
        name = f"{dtype}/graphs_{'on' if graphs else 'off'}"
        return Rig(name, engine, drafter, SpeculativeGenerator(engine), SpeculativeGenerator(engine, drafter), config)


def train_tiny_head(ckpt, args: argparse.Namespace):
    """Tiny mode: an EAGLE-3 head trained for a few seconds on the tiny target's own greedy outputs (as the
    lossless tests do), so drafts are partly accepted and every verification outcome is exercised."""
    from tide_trt.config import EngineConfig
    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.training.data import recompute_examples
    from tide_trt.training.offline import TrainSettings, build_vocab_and_head, train_head

    engine = TorchTargetEngine(ckpt, EngineConfig(dtype="float32", max_batch_size=16, max_seq_len=256,
                                                  cpu_kernels="off"))
    prompts = tiny_prompts(16, engine.info.vocab_size, seed=11)
    done = run_requests(SpeculativeGenerator(engine), prompts, 48, 0, (), "tiny-train")
    seqs = [p + out for p, out in zip(prompts, done.outputs, strict=True)]
    examples = recompute_examples(engine, seqs, progress=False, store_dtype=torch.float32)
    head, t2d, _ = build_vocab_and_head(engine, examples, min(64, engine.info.vocab_size))
    train_head(head, examples, t2d, TrainSettings(epochs=args.tiny_train_epochs, batch_size=8, lr=3e-3, ttt_steps=3),
               progress=False)
    return head


def tiny_prompts(n: int, vocab: int, seed: int, min_len: int = 2, max_len: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]


# ---- running requests -------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    outputs: list[list[int]]
    seconds: float
    step_calls: int  # generator steps (prefill steps included)
    verify_steps: int  # per-sequence decode/verification steps (the prefill's first token excluded)
    tokens: int
    decode_tokens: int
    drafted: int
    accepted: int


def sampled(args: argparse.Namespace) -> Callable[[int], Any]:
    """Per-request sampling of the sampled runs: `--sample-temperature` / `--sample-top-p`, a seed per request."""
    from tide_trt.spec.sampling import SamplingParams

    return lambda i: SamplingParams(temperature=args.sample_temperature, top_p=args.sample_top_p, seed=1000 + i)


def run_requests(gen, prompts: Sequence[list[int]], max_new: int, gamma: int, eos: tuple[int, ...], tag: str,
                 sampling: Callable[[int], Any] | None = None,
                 on_step: Callable[[Callable[[], list]], list] | None = None) -> RunResult:
    """Add every prompt, step at γ until all finish, release; outputs in prompt order. `on_step` wraps each
    `gen.step` call (the breakdown times it)."""
    from tide_trt.engine.generator import GenerationRequest
    from tide_trt.spec.sampling import SamplingParams

    reqs = [GenerationRequest(f"{tag}-{i}", list(p), max_new,
                              sampling(i) if sampling else SamplingParams(), tuple(eos)) for i, p in enumerate(prompts)]
    seqs = [gen.add(r) for r in reqs]
    device = gen.engine.info.device
    sync(device)
    t0 = time.perf_counter()
    step_calls = verify_steps = tokens = decode_tokens = drafted = accepted = 0
    limit = 2 * (max_new + 8) + len(reqs)  # a step that commits nothing must not hang the check
    try:
        while any(not s.finished for s in seqs):
            if step_calls >= limit:
                raise RuntimeError(f"{tag}: sequences still unfinished after {step_calls} steps")
            events = on_step(lambda: gen.step(gamma)) if on_step else gen.step(gamma)
            step_calls += 1
            for ev in events:
                tokens += len(ev.new_token_ids)
                if not ev.is_prefill:
                    verify_steps += 1
                    decode_tokens += len(ev.new_token_ids)
                    drafted += ev.num_draft
                    accepted += ev.num_accepted
        sync(device)
        seconds = time.perf_counter() - t0
        outputs = [list(s.output_ids) for s in seqs]
    finally:
        for r in reqs:
            gen.release(r.request_id)
    return RunResult(outputs, seconds, step_calls, verify_steps, tokens, decode_tokens, drafted, accepted)


# ---- 1. lossless --------------------------------------------------------------------------------------------------
def compare_outputs(plain: Sequence[Sequence[int]], spec: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Token-for-token comparison of two output sets (same prompts, same order)."""
    if len(plain) != len(spec):
        raise ValueError(f"{len(plain)} plain outputs vs {len(spec)} speculative outputs")
    mismatches = []
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        if list(a) != list(b):
            first = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            mismatches.append({"prompt": i, "first_diff": first, "plain_tokens": len(a), "spec_tokens": len(b)})
    identical = len(plain) - len(mismatches)
    return {"identical": identical, "total": len(plain), "passed": identical == len(plain) and len(plain) > 0,
            "mismatches": mismatches}


def lossless_check(rig: Rig, prompts: Sequence[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy speculative (γ = args.gamma) vs plain greedy decoding, in chunks of the same batch size."""
    from tide_trt.spec.sampling import SamplingParams

    sampling = None
    if args.break_spec:  # self-test: the speculative side samples, so the comparison must report mismatches
        sampling = lambda i: SamplingParams(temperature=1.0, seed=1000 + i)
    bs, max_new = args.lossless_batch_size, args.lossless_max_new_tokens
    plain: list[list[int]] = []
    spec: list[list[int]] = []
    runs = {"plain": [], "spec": []}
    for i in range(0, len(prompts), bs):
        chunk = prompts[i:i + bs]
        a = run_requests(rig.plain, chunk, max_new, 0, rig.eos, f"lp{i}")
        b = run_requests(rig.spec, chunk, max_new, args.gamma, rig.eos, f"ls{i}", sampling)
        plain += a.outputs
        spec += b.outputs
        runs["plain"].append(a)
        runs["spec"].append(b)
    result = compare_outputs(plain, spec)
    sp = runs["spec"]
    steps = sum(r.verify_steps for r in sp)
    result.update({
        "engine": rig.config, "batch_size": bs, "max_new_tokens": max_new, "gamma": args.gamma,
        "broken_on_purpose": bool(args.break_spec),
        "plain_tokens": sum(len(o) for o in plain), "spec_tokens": sum(len(o) for o in spec),
        "drafted": sum(r.drafted for r in sp), "accepted": sum(r.accepted for r in sp),
        "tau": sum(r.decode_tokens for r in sp) / steps if steps else None,
        "seconds": {"plain": sum(r.seconds for r in runs["plain"]), "spec": sum(r.seconds for r in sp)},
    })
    log.info("lossless %s: %d/%d identical (τ %s)", rig.name, result["identical"], result["total"],
             f"{result['tau']:.2f}" if result["tau"] else "-")
    return result


# ---- 2. throughput ------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    step_calls: int = 0
    verify_steps: int = 0
    decode_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    prompts: int = 0
    chunk_tokens_per_s: list[float] = field(default_factory=list)

    def add(self, r: RunResult, prompts: int) -> None:
        self.tokens += r.tokens
        self.seconds += r.seconds
        self.step_calls += r.step_calls
        self.verify_steps += r.verify_steps
        self.decode_tokens += r.decode_tokens
        self.drafted += r.drafted
        self.accepted += r.accepted
        self.prompts += prompts
        self.chunk_tokens_per_s.append(r.tokens / r.seconds if r.seconds else 0.0)

    def summary(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
                "step_calls": self.step_calls,
                "ms_per_step": 1e3 * self.seconds / self.step_calls if self.step_calls else None,
                "tau": self.decode_tokens / self.verify_steps if self.verify_steps else None,
                "acceptance": self.accepted / self.drafted if self.drafted else None,
                "chunk_tokens_per_s": self.chunk_tokens_per_s}


def hf_generate(model, chunk: Sequence[list[int]], max_new: int, pad_id: int, eos: tuple[int, ...],
                device: str) -> RunResult:
    """HF transformers greedy `generate` on one chunk (left padding); tokens counted up to the first EOS."""
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=1,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=list(eos) or None)
    sync(device)
    seconds = time.perf_counter() - t0
    rows = out[:, width:].tolist()
    outputs = [row[:next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in rows]
    tokens = sum(len(o) for o in outputs)
    steps = len(rows[0]) if rows else 0
    return RunResult(outputs, seconds, steps, steps * len(chunk), tokens, tokens - len(chunk), 0, 0)


def load_hf(models: Models, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(models.ckpt.path), dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    log.info("HF model loaded in %.1f s (%s, %s)", time.perf_counter() - t0, dtype, device)
    return model


def throughput(rig: Rig, prompts: Sequence[list[int]], bs: int, args: argparse.Namespace, budget: Budget,
               hf_model=None) -> dict[str, Any]:
    """Plain and speculative, greedy and sampled (and HF generate, greedy) on the same chunks of `bs` prompts,
    each system's turn rotating per chunk; one untimed warm-up chunk per system first (CUDA graph capture,
    allocator, kernels)."""
    chunks = max(1, math.ceil(args.min_prompts / bs))
    work = cycled(prompts, bs * chunks)
    max_new = args.max_new_tokens
    sample = sampled(args)
    systems: dict[str, Callable[[list[list[int]], int, int], RunResult]] = {
        "plain": lambda c, k, n: run_requests(rig.plain, c, n, 0, rig.eos, f"tp{bs}-{k}"),
        "spec": lambda c, k, n: run_requests(rig.spec, c, n, args.gamma, rig.eos, f"ts{bs}-{k}"),
        "plain_sampled": lambda c, k, n: run_requests(rig.plain, c, n, 0, rig.eos, f"tq{bs}-{k}", sample),
        "spec_sampled": lambda c, k, n: run_requests(rig.spec, c, n, args.gamma, rig.eos, f"tr{bs}-{k}", sample),
    }
    if hf_model is not None:
        pad = rig.eos[0] if rig.eos else 0
        systems["hf_generate"] = lambda c, k, n: hf_generate(hf_model, c, n, pad, rig.eos, args.device)
    t0 = time.perf_counter()
    for name, fn in systems.items():
        fn(work[:bs], -1, min(max_new, args.warmup_tokens))
        log.debug("warm-up %s done", name)
    warmup_s = time.perf_counter() - t0
    tallies = {name: Tally() for name in systems}
    names = list(systems)
    done = 0
    for k in range(chunks):
        if budget.expired():
            break
        chunk = work[k * bs:(k + 1) * bs]
        for name in names[k % len(names):] + names[:k % len(names)]:
            tallies[name].add(systems[name](chunk, k, max_new), len(chunk))
        done += 1
        log.info("throughput %s bs %d: chunk %d/%d", rig.name, bs, done, chunks)
    row: dict[str, Any] = {name: t.summary() for name, t in tallies.items()}
    row.update({"batch_size": bs, "chunks": done, "chunks_planned": chunks, "truncated_by_budget": done < chunks,
                "distinct_prompts": min(len(prompts), bs * done), "max_new_tokens": max_new,
                "warmup_s": warmup_s})
    row["sampling"] = {"temperature": args.sample_temperature, "top_p": args.sample_top_p}
    plain_tps = row["plain"]["tokens_per_s"]
    sampled_tps = row["plain_sampled"]["tokens_per_s"]
    if done and sampled_tps:
        row["spec_vs_plain_sampled"] = row["spec_sampled"]["tokens_per_s"] / sampled_tps
    if done and plain_tps:
        row["spec_vs_plain"] = row["spec"]["tokens_per_s"] / plain_tps
        if "hf_generate" in row and row["hf_generate"]["tokens_per_s"]:
            row["plain_vs_hf"] = plain_tps / row["hf_generate"]["tokens_per_s"]
    return row


# ---- 3. profile table ---------------------------------------------------------------------------------------------
def profile_table(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """What `tide profile` prints, measured on this engine variant (not read from the profile cache)."""
    from tide_trt.online.engine_profile import profile_engine
    from tide_trt.online.profiling import format_profile_table

    t0 = time.perf_counter()
    prof = profile_engine(rig.engine, rig.drafter, args.profile_gamma_max,
                          batch_sizes=tuple(args.profile_batch_sizes), repeats=args.profile_repeats)
    return {"engine": rig.config, "gamma_max": args.profile_gamma_max, "batch_sizes": args.profile_batch_sizes,
            "repeats": args.profile_repeats, "seconds": time.perf_counter() - t0,
            "profile": prof.to_dict(), "table": format_profile_table(prof)}


# ---- 4. step-time breakdown ---------------------------------------------------------------------------------------
class StepTimer:
    """Synchronize-bracketed wall time of named calls inside each generator step. For the duration of a
    `with timer.attached():` instance attributes wrap the real methods (nothing else changes); a part may name
    several methods (`forward_step`, and `forward` that calls it): only the outermost call is timed."""

    def __init__(self, device: str, targets: dict[str, tuple[Any, tuple[str, ...]]],
                 prompt_tokens: Callable[[], int] = lambda: 0) -> None:
        self.device = device
        self.prompt_tokens = prompt_tokens  # the generator's last_step_prompt_tokens: > 0 -> not a decode step
        self.targets = targets  # part -> (object, method names); object None: the part does not run here
        self.current: dict[str, list[float]] = {}
        self.depth: dict[str, int] = {}
        self.steps: list[dict[str, Any]] = []
        self.wrapped: dict[str, list[str]] = {}

    def _wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            if self.depth.get(part):
                return fn(*a, **kw)
            self.depth[part] = 1
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                self.current.setdefault(part, []).append(time.perf_counter() - t0)
                self.depth[part] = 0
        return timed

    @contextlib.contextmanager
    def attached(self) -> Iterator[StepTimer]:
        saved = []
        for part, (obj, attrs) in self.targets.items():
            if obj is None:
                continue
            for attr in attrs:
                if not callable(getattr(obj, attr, None)):
                    continue
                saved.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
                setattr(obj, attr, self._wrap(part, getattr(obj, attr)))
                self.wrapped.setdefault(part, []).append(f"{type(obj).__name__}.{attr}")
        try:
            yield self
        finally:
            for obj, attr, had, old in reversed(saved):
                if had:
                    setattr(obj, attr, old)
                else:
                    delattr(obj, attr)

    def step(self, call: Callable[[], list]) -> list:
        self.current = {}
        sync(self.device)
        t0 = time.perf_counter()
        events = call()
        sync(self.device)
        total = time.perf_counter() - t0
        decode = bool(events) and not any(ev.is_prefill for ev in events) and self.prompt_tokens() == 0
        self.steps.append({"total": total, "decode": decode, "tokens": sum(len(ev.new_token_ids) for ev in events),
                           "parts": {k: (sum(v), len(v)) for k, v in self.current.items()}})
        return events

    def summary(self) -> dict[str, Any]:
        steps = [s for s in self.steps if s["decode"]]
        out: dict[str, Any] = {"decode_steps": len(steps), "steps_with_prefill": len(self.steps) - len(steps),
                               "timed_methods": self.wrapped}
        if not steps:
            return out
        n = len(steps)
        out["step_ms"] = 1e3 * statistics.fmean(s["total"] for s in steps)
        out["step_ms_median"] = 1e3 * statistics.median(s["total"] for s in steps)
        out["tokens_per_step"] = statistics.fmean(s["tokens"] for s in steps)
        accounted = 0.0
        for part in self.targets:
            secs = [s["parts"].get(part, (0.0, 0))[0] for s in steps]
            calls = sum(s["parts"].get(part, (0.0, 0))[1] for s in steps)
            out[f"{part}_ms"] = 1e3 * statistics.fmean(secs) if calls else None  # None: never called
            out[f"{part}_calls_per_step"] = calls / n
            accounted += sum(secs)
        out["rest_ms"] = 1e3 * (sum(s["total"] for s in steps) - accounted) / n
        return out


def step_breakdown(rig: Rig, prompts: Sequence[list[int]], bs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Per decode step of plain, speculative (greedy) and sampled speculative decoding at batch size `bs`: target
    forward, draft proposal and the rest (verification, sampling, KV rollback, Python bookkeeping),
    synchronize-bracketed."""
    chunk = cycled(prompts, bs)
    row: dict[str, Any] = {"batch_size": bs, "max_new_tokens": args.breakdown_max_new_tokens,
                           "method": "torch.cuda.synchronize-bracketed perf_counter" if args.device.startswith("cuda")
                           else "perf_counter",
                           "parts": {"target_forward": "TargetEngine.forward_step (or .forward) calls",
                                     "draft": "ChainDrafter.propose calls",
                                     "rest": "step wall time minus both (verification, sampling, KV rollback, "
                                             "bookkeeping)"}}
    sample = sampled(args)
    for mode, gen, gamma, how in (("plain", rig.plain, 0, None), ("spec", rig.spec, args.gamma, None),
                                  ("spec_sampled", rig.spec, args.gamma, sample)):
        run_requests(gen, chunk, min(args.warmup_tokens, args.breakdown_max_new_tokens), gamma, rig.eos,
                     f"bw{mode}{bs}", how)  # warm-up (graph capture) outside the timed run
        timer = StepTimer(args.device, {"target_forward": (rig.engine, ("forward_step", "forward")),
                                        "draft": (rig.drafter if gamma else None, ("propose",))},
                          prompt_tokens=lambda g=gen: g.last_step_prompt_tokens)
        with timer.attached():
            run_requests(gen, chunk, args.breakdown_max_new_tokens, gamma, rig.eos, f"b{mode}{bs}", how,
                         on_step=timer.step)
        row[mode] = timer.summary()
    return row

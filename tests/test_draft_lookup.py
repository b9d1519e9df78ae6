"""N-gram lookup proposals: the pure continuation rule, lossless greedy and sampled decoding with lookups taking
rows, and the default model decoding identically with `draft.lookup_ngram` on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.lookup import lookup_continuation
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.runtime import run_to_completion
from tide_trt.spec.sampling import SamplingParams
from tide_trt.training.offline import new_head


def test_lookup_continuation_rule() -> None:
    h = np.array
    assert lookup_continuation(h([1, 2, 3, 4]), 2, 3) is None  # the last 2-gram never occurred before
    assert lookup_continuation(h([1, 2, 9, 9, 1, 2]), 2, 3) == [9, 9, 1]  # what followed "1 2" the last time
    assert lookup_continuation(h([5, 1, 2, 7, 1, 2, 8, 1, 2]), 2, 2) == [8, 1]  # the most recent occurrence wins
    assert lookup_continuation(h([4, 1, 2, 3, 1, 2, 3]), 3, 5) == [1, 2, 3, 1, 2]  # a loop keeps looping
    assert lookup_continuation(h([7, 7, 7]), 1, 4) == [7, 7, 7, 7]
    assert lookup_continuation(h([1, 2]), 2, 3) is None and lookup_continuation(h([1, 1, 1]), 0, 3) is None


def _loopy_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a short pattern, so the history offers lookups from the first step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pattern = torch.randint(3, vocab, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        out.append(torch.randint(3, vocab, (3,), generator=gen).tolist() + pattern * 4)
    return out


def _run(engine, drafter, prompts, gamma, sampling=None, max_new=32):
    gen = SpeculativeGenerator(engine, drafter)
    reqs = [GenerationRequest(str(i), p, max_new, sampling=sampling or SamplingParams()) for i, p in
            enumerate(prompts)]
    return run_to_completion(gen, reqs, gamma).sequences


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_with_lookups_is_lossless_and_lookups_are_used(tiny_checkpoint, gamma, monkeypatch):
    engine = make_engine(tiny_checkpoint)
    prompts = _loopy_prompts(4, 96, seed=gamma) + random_prompts(3, 96, seed=gamma)  # both kinds in one batch
    plain = _run(engine, None, prompts, 0)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(96))  # an untrained head: accepted drafts come from the lookups
    drafter = ChainDrafter(head, 8, 256, torch.float32, "cpu", lookup_ngram=2)
    used = []
    real = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda *a, **k: used.append(r := real(*a, **k)) or r)
    spec = _run(engine, drafter, prompts, gamma)
    for a, s in zip(plain, spec, strict=True):
        assert s.output_ids == a.output_ids
    rows = [flag for p in used for flag in p.from_lookup]
    assert any(rows) and not all(rows)  # lookup rows and head rows, in the same steps
    head_only = _run(engine, ChainDrafter(head, 8, 256, torch.float32, "cpu"), prompts, gamma)
    accepted = sum(s.accepted_tokens for s in spec)
    assert accepted > 2 * sum(s.accepted_tokens for s in head_only) + 10, accepted  # the lookups are accepted


def test_sampling_with_lookups_feeds_one_hot_draft_distributions(tiny_checkpoint):
    """Sampled decoding runs with lookups, and a lookup row hands verification a one-hot draft distribution at
    its tokens — what keeps rejection sampling exact for it (verification itself is tested for any draft q)."""
    engine = make_engine(tiny_checkpoint)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(96))
    drafter = ChainDrafter(head, 8, 256, torch.float32, "cpu", lookup_ngram=2)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    seqs = _run(engine, drafter, _loopy_prompts(3, 96, seed=9), 3, sampling=sampling, max_new=24)
    assert all(len(s.output_ids) == 24 for s in seqs)
    from tide_trt.draft.drafter import DraftSampling

    hist = [[5, 6, 5, 6, 5]]
    slot = 0
    pend = [torch.zeros(5, 3, engine.info.hidden_size)]
    ds = DraftSampling(torch.tensor([0.8]), torch.tensor([1.0]), torch.tensor([0]), [torch.Generator()])
    proposal = drafter.propose([slot], pend, [[6, 5, 6, 5, 9]], 3, ds, hist)
    assert proposal.from_lookup == [True] and proposal.tokens.tolist() == [[6, 5, 6]]
    assert torch.equal(proposal.probs[0], torch.nn.functional.one_hot(torch.tensor([6, 5, 6]), 96).float())


def test_default_model_greedy_identical_with_lookups(default_checkpoint, default_tokenizer, default_draft_dir):
    from tide_trt.kernels import load_gemm_bf16w
    from tide_trt.runtime import build_drafter, encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    native = load_gemm_bf16w() is not None  # the CPU serving mode where it builds; float32 elsewhere
    engine = make_engine(default_checkpoint, dtype="bfloat16" if native else "float32", max_batch_size=3,
                         max_seq_len=320, tokenizer=default_tokenizer, cpu_kernels="auto" if native else "off")
    prompts = [encode_prompt(default_tokenizer, p)[:160] for p in sharegpt_prompts(3, seed=5)]
    plain = _run(engine, None, prompts, 0, max_new=64)
    spec = _run(engine, build_drafter(engine, default_draft_dir, lookup_ngram=3), prompts, 3, max_new=64)
    for a, s in zip(plain, spec, strict=True):
        assert s.output_ids == a.output_ids
    assert sum(s.accepted_tokens for s in spec) > 0


def test_negative_lookup_ngram_is_refused():
    # the config is the one validator of draft.lookup_ngram (build_drafter takes the validated value)
    from tide_trt.config import config_from_dict
    from tide_trt.errors import TideError

    with pytest.raises(TideError, match="lookup_ngram"):
        config_from_dict({"draft": {"lookup_ngram": -1}})


def test_rows_the_lookup_covers_draft_lookup_gamma_tokens(tiny_checkpoint):
    """draft.lookup_gamma: a row whose history repeats drafts lookup_gamma tokens (per-row γ) while head rows keep γ;
    greedy output stays identical to plain decoding and the long lookup drafts are accepted."""
    engine = make_engine(tiny_checkpoint)
    prompts = _loopy_prompts(4, 96, seed=12) + random_prompts(3, 96, seed=12)
    plain = _run(engine, None, prompts, 0)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(96))
    drafter = ChainDrafter(head, 8, 256, torch.float32, "cpu", lookup_ngram=2, lookup_gamma=6)
    gen = SpeculativeGenerator(engine, drafter)
    for i, p in enumerate(prompts):
        gen.add(GenerationRequest(str(i), p, 32))
    drafted: set[int] = set()
    longest = 0
    while any(not s.finished for s in gen.sequences.values()):
        for ev in gen.step(2):
            drafted.add(ev.num_draft)
            longest = max(longest, ev.num_accepted)
    assert [gen.sequences[str(i)].output_ids for i in range(len(prompts))] == [s.output_ids for s in plain]
    assert {2, 6} <= drafted  # head rows at γ = 2 and lookup rows at lookup_gamma = 6 (in the same run)
    assert longest > 2  # more tokens accepted in one step than γ allows

"""The training-time-test chain (`Eagle3Head.ttt_forward`, what `ttt_loss` and `simulated_acceptance` run) is the
serving chain (`Eagle3Head.step`: the drafter's catch-up and eager chained steps; `Eagle3Head.greedy_chain`: the
fixed-shape greedy chain CUDA graphs capture) on the same inputs.

A chain based at true entry p: serving catches up on entries 0..p (target capture states, tokens 1..p+1), then
drafts d1, d2, ... feeding its own hidden back. Training computes every chain of a sequence in one pass, with
teacher forcing: step j at position q sees the true token q+1. So the training input is the sequence whose
tokens after the base are the serving chain's own drafts; then step j of training at position p + j must give
the logits of the serving chain's j-th step, for every base p at once."""

from __future__ import annotations

import pytest
import torch

from tide_trt.draft.eagle3 import Eagle3Config, Eagle3Head
from tide_trt.engine.kv_cache import KVCache

V, VD, H = 64, 40, 32
T = 24  # positions of the stored sequence
GAMMA = 5
BASES = [0, 3, 9, 14, 18]  # one chain per batch row; the last one ends at position T - 1

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def head() -> Eagle3Head:
    gen = torch.Generator().manual_seed(0)
    cfg = Eagle3Config(hidden_size=H, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                       rms_norm_eps=1e-5, rope_theta=10_000.0, target_vocab_size=V, draft_vocab_size=VD,
                       capture_layers=(1, 2, 3), model_fingerprint="test", max_position=64)
    h = Eagle3Head(cfg, torch.randn(V, H, generator=gen))
    with torch.no_grad():
        for p in h.parameters():  # norms too: a unit norm weight would hide a swapped norm
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 1.0))
        h.d2t.copy_(torch.randperm(V, generator=gen)[:VD].sort().values)
    return h.eval()


def serving_chain(head: Eagle3Head, captured: torch.Tensor, tokens: torch.Tensor, base: int
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """captured [T, C, H], tokens [T] (token p+1 of entry p). Catch up on entries 0..base in a fresh cache, then
    GAMMA - 1 eager chained steps. Returns per-step draft-vocab logits ([Vd] each, GAMMA of them) and the greedy
    target-vocab drafts [GAMMA]."""
    c = head.cfg
    cache = KVCache(1, 1, c.num_kv_heads, T + GAMMA + 2, c.head_dim, torch.float32, "cpu")
    slot, zero = torch.tensor([0]), torch.tensor([0])
    hidden, logits = head.step(cache, slot, head.fuse(captured[None, : base + 1]), tokens[None, : base + 1], zero,
                               torch.tensor([base]))  # [1, H], [1, Vd]
    steps = [logits[0]]
    drafts = [head.d2t[logits.argmax(-1)]]  # [1] target ids
    for j in range(1, GAMMA):
        hidden, logits = head.step(cache, slot, hidden[:, None], drafts[-1][:, None], torch.tensor([base + j]), zero)
        steps.append(logits[0])
        drafts.append(head.d2t[logits.argmax(-1)])
    return steps, torch.cat(drafts)


def greedy_chain(head: Eagle3Head, captured: torch.Tensor, tokens: torch.Tensor, base: int) -> torch.Tensor:
    """The fixed-shape greedy chain after the same catch-up: target-vocab drafts [GAMMA]."""
    c = head.cfg
    cache = KVCache(1, 2, c.num_kv_heads, T + GAMMA + 2, c.head_dim, torch.float32, "cpu")
    slot = torch.tensor([1])  # not slot 0: the chain reads its own slot's rows
    hidden, logits = head.step(cache, slot, head.fuse(captured[None, : base + 1]), tokens[None, : base + 1],
                               torch.tensor([0]), torch.tensor([base]))
    return head.greedy_chain(cache, slot, hidden, logits, torch.tensor([base + 1]), GAMMA)[0]


def test_training_chain_equals_serving_chain(head: Eagle3Head) -> None:
    gen = torch.Generator().manual_seed(1)
    captured = torch.randn(T, 3, H, generator=gen)  # [T, C, H] target capture states
    tokens = torch.randint(0, V, (T,), generator=gen)  # [T] token p+1 of entry p
    rows = []
    expected = []
    for base in BASES:
        steps, drafts = serving_chain(head, captured, tokens, base)
        assert torch.equal(greedy_chain(head, captured, tokens, base), drafts), base
        row = tokens.clone()
        end = min(T, base + GAMMA)
        row[base + 1: end] = drafts[: end - base - 1]  # teacher forcing with the serving chain's own drafts
        rows.append(row)
        expected.append(steps)
    batch = captured.expand(len(BASES), -1, -1, -1)  # [B, T, C, H]
    with torch.no_grad():
        trained = head.ttt_forward(batch, torch.stack(rows), GAMMA)  # [B, T, Vd] per step
        hiddens = head.ttt_forward(batch, torch.stack(rows), GAMMA, return_hidden=True)  # [B, T, H]: ttt_loss's path
    compared = 0
    for b, base in enumerate(BASES):
        for j in range(GAMMA):
            if base + j >= T:
                continue
            torch.testing.assert_close(trained[j][b, base + j], expected[b][j], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, b=b, j=j: f"base {BASES[b]}, step {j}: {m}")
            torch.testing.assert_close(head.logits(hiddens[j][b, base + j]), expected[b][j], rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared == sum(min(GAMMA, T - p) for p in BASES) > 20


def test_the_comparison_sees_the_chain(head: Eagle3Head) -> None:
    """Power: the chained steps differ from the true-feature step-0 logits at the same positions (the chain's own
    hidden and drafts matter), so a training chain that ignored them could not pass the test above."""
    gen = torch.Generator().manual_seed(1)
    captured = torch.randn(T, 3, H, generator=gen)
    tokens = torch.randint(0, V, (T,), generator=gen)
    steps, _ = serving_chain(head, captured, tokens, 3)
    with torch.no_grad():
        step0 = head.ttt_forward(captured[None], tokens[None], 1)[0][0]  # [T, Vd]
    for j in range(1, GAMMA):
        assert (step0[3 + j] - steps[j]).abs().max() > 1e-2

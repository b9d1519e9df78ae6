"""Deterministic tests of tide_trt.spec: greedy verification, sampling helpers, rejection edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tide_trt.errors import RequestError
from tide_trt.spec import (
    RESIDUAL_EPS,
    SamplingParams,
    greedy_verify,
    inverse_cdf_sample,
    logits_to_probs,
    make_generator,
    mixed_verify,
    params_to_tensors,
    rejection_verify,
    sample_from_probs,
    scatter_to_target_vocab,
)

V = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


def logits_for(targets: list[list[int]], v: int = V) -> torch.Tensor:
    """Logits [B, len, V] whose argmax at [b, i] is targets[b][i]."""
    out = torch.randn(len(targets), len(targets[0]), v, generator=torch.Generator().manual_seed(1))
    for b, row in enumerate(targets):
        for i, t in enumerate(row):
            out[b, i, t] = 10.0  # [B, gamma+1, V]
    return out


def reference_greedy(draft: list[int], argmaxes: list[int]) -> list[int]:
    """Plain Python loop: accept while equal, then append the target's token."""
    out = []
    for i, d in enumerate(draft):
        if d != argmaxes[i]:
            break
        out.append(d)
    out.append(argmaxes[len(out)])
    return out


# ---------------------------------------------------------------- greedy
@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # all accepted -> bonus
        ([5, 2, 3], [1, 2, 3, 4], [1]),  # first rejected -> recovered
        ([1, 6, 3], [1, 2, 3, 4], [1, 2]),  # middle rejected (later match ignored)
        ([1, 2, 7], [1, 2, 3, 4], [1, 2, 3]),  # last rejected
        ([], [6], [6]),  # gamma = 0: plain decoding
    ],
)
def test_greedy_hand_made(draft: list[int], target: list[int], expected: list[int]) -> None:
    res = greedy_verify(torch.tensor([draft], dtype=torch.int64).reshape(1, -1), logits_for([target]))
    gamma = len(draft)
    assert res.output_ids.shape == (1, gamma + 1) and res.output_ids.dtype == torch.int64
    assert res.tolist() == [expected]
    assert res.num_output.tolist() == [len(expected)]
    assert res.num_accepted.tolist() == [len(expected) - 1]
    assert res.output_ids[0, len(expected) :].eq(-1).all()
    assert res.bonus.tolist() == [len(expected) == gamma + 1]


def test_greedy_batch_mixed_outcomes() -> None:
    draft = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [1, 2, 3]])  # [B, gamma]
    target = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 4]]
    res = greedy_verify(draft, logits_for(target).to(torch.bfloat16))
    assert res.tolist() == [[1, 2, 3, 4], [1], [1, 2], [1, 2, 5]]
    assert res.num_accepted.tolist() == [3, 0, 1, 2]
    assert res.output_ids.tolist()[1] == [1, -1, -1, -1]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 6),
    gamma=st.integers(0, 5),
    v=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_greedy_matches_python_reference(b: int, gamma: int, v: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, gamma + 1, v, generator=gen)  # [B, gamma+1, V]
    argmaxes = logits.argmax(-1)  # [B, gamma+1]
    # small vocab: drafts often match; also copy the target on some rows to reach the bonus
    draft = torch.randint(0, v, (b, gamma), generator=gen)  # [B, gamma]
    draft[::2] = argmaxes[::2, :gamma]
    res = greedy_verify(draft, logits)
    expected = [reference_greedy(draft[i].tolist(), argmaxes[i].tolist()) for i in range(b)]
    assert res.tolist() == expected
    assert res.num_output.tolist() == [len(e) for e in expected]


def test_greedy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        greedy_verify(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, V))


# ---------------------------------------------------------------- sampling
def probs_of(logits: torch.Tensor, t: float, p: float = 1.0, k: int = 0) -> torch.Tensor:
    n = logits.shape[0]
    return logits_to_probs(logits, torch.full((n,), t), torch.full((n,), p), torch.full((n,), k))


def test_temperature_zero_is_one_hot_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)).to(torch.float16)  # [N, V]
    probs = probs_of(logits, 0.0)
    assert probs.dtype == torch.float32
    assert torch.equal(probs.argmax(-1), logits.float().argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(5)) and probs.max(-1).values.eq(1).all()
    assert torch.equal(sample_from_probs(probs, [None] * 5), logits.float().argmax(-1))


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))  # [N, V]
    assert torch.equal(probs_of(logits, 0.7, k=1), probs_of(logits, 0.0))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert torch.equal(sample_from_probs(probs_of(logits, 0.7, k=1), gens), logits.argmax(-1))


def test_top_k_and_temperature() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # [1, V]
    probs = probs_of(logits, 2.0, k=2)
    expected = torch.zeros(1, 4)
    expected[0, [1, 3]] = torch.softmax(torch.tensor([3.0, 2.0]) / 2.0, -1)
    torch.testing.assert_close(probs, expected)


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.25, 0.125, 0.025]]))  # [1, V]
    kept = [(probs_of(logits, 1.0, p=top_p) > 0).nonzero()[:, 1].tolist() for top_p in (0.3, 0.5, 0.6, 0.8)]
    assert kept == [[1], [1], [1, 2], [1, 2, 3]]
    probs = probs_of(logits, 1.0, p=0.75)  # 0.5 + 0.25 reaches 0.75 exactly
    torch.testing.assert_close(probs, torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0, 0.0]]))
    # top-k first, then top-p on the renormalised top-k distribution: 0.5 / 0.75 >= 0.6 keeps one token
    assert (probs_of(logits, 1.0, p=0.6, k=2) > 0).sum().item() == 1
    assert (probs_of(logits, 1.0, p=0.7, k=2) > 0).sum().item() == 2
    assert torch.equal(probs_of(logits, 1.0, p=1e-9), probs_of(logits, 0.0))


def test_tiny_temperature_is_finite() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, -1.0]])  # [N, V]
    probs = probs_of(logits, 1e-30)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))


def test_per_row_params_and_rows_sum_to_one() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))  # [N, V]
    params = [
        SamplingParams(),
        SamplingParams(1.0),
        SamplingParams(0.5, top_p=0.9),
        SamplingParams(2.0, top_k=5),
    ]
    probs = logits_to_probs(logits, *params_to_tensors(params))  # [N, V]
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert (probs > 0).sum(-1).tolist()[0] == 1 and (probs > 0).sum(-1).tolist()[3] == 5
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_validation_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs).validate()


def test_valid_params_and_generators() -> None:
    SamplingParams(temperature=0.8, top_p=1.0, top_k=40, seed=123).validate()
    assert SamplingParams().is_greedy and make_generator(SamplingParams(seed=5)) is None
    probs = torch.softmax(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)), -1)  # [N, V]
    params = SamplingParams(temperature=1.0, seed=42)

    def run() -> list[int]:
        gen = make_generator(params)
        return [sample_from_probs(probs, [gen] * 3).tolist() for _ in range(3)]

    assert run() == run()
    unseeded = make_generator(SamplingParams(temperature=1.0))
    assert unseeded is not None and unseeded.initial_seed() != make_generator(params).initial_seed()


def test_sample_never_returns_zero_mass_token() -> None:
    probs = torch.zeros(2000, 6)  # [N, V]
    probs[:, 0] = 0.0
    probs[:, 2] = 0.3
    probs[:, 5] = 0.7
    tokens = sample_from_probs(probs, [torch.Generator().manual_seed(0)] * 2000)
    assert set(tokens.tolist()) == {2, 5}


# ---------------------------------------------------------------- rejection verification (exact cases)
def test_rejection_gamma_zero_matches_plain_sampling() -> None:
    p = torch.softmax(torch.randn(5, 1, 40, generator=torch.Generator().manual_seed(0)), -1)  # [B, 1, V]
    gens_a = [torch.Generator().manual_seed(i) for i in range(5)]
    gens_b = [torch.Generator().manual_seed(i) for i in range(5)]
    res = rejection_verify(torch.zeros(5, 0, dtype=torch.int64), torch.zeros(5, 0, 40), p, gens_a)
    assert torch.equal(res.output_ids[:, 0], sample_from_probs(p[:, 0], gens_b))
    assert res.num_output.eq(1).all()


def test_rejection_edge_cases_no_nan() -> None:
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]]).repeat(3, 1, 1)  # [B, gamma+1, V]
    q = torch.zeros(3, 1, 4)  # [B, gamma, V]
    q[0, 0, 3] = 1.0  # draft d=3 where the target has no mass -> always rejected
    q[1, 0, 1] = 0.0  # q(d)=0 (impossible draft), p(d)>0 -> accepted, no NaN
    q[2, 0] = p[2, 0]  # identical -> accepted; residual all zero would fall back to p
    draft = torch.tensor([[3], [1], [2]])  # [B, gamma]
    for seed in range(20):
        res = rejection_verify(draft, q, p, [torch.Generator().manual_seed(seed)] * 3)
        assert res.num_accepted.tolist() == [0, 1, 1]
        assert res.output_ids[0, 0].item() in (1, 2) and res.output_ids[1:, 1].ge(1).all()
    # residual max(0, p - q) all zero at a rejection -> sample from p (never NaN, never a zero-mass token)
    # (p <= q everywhere: unnormalised p, as float32 rounding can produce)
    p1 = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # [1, 2, V]
    q1 = torch.tensor([[[0.0, 0.5, 0.5]]])  # [1, 1, V]
    res = rejection_verify(torch.tensor([[1]]), q1, p1, [torch.Generator().manual_seed(0)])
    assert res.tolist() == [[2]]


def reference_rejection(
    draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, gen: torch.Generator
) -> list[int]:
    """One row, plain Python loop, same uniforms: [gamma acceptance draws, one sampling draw]."""
    gamma = len(draft)
    u = torch.rand((1, gamma + 1), generator=gen)[0]  # [gamma+1]
    out: list[int] = []
    for i, d in enumerate(draft.tolist()):
        if u[i] * q[i, d] < p[i, d]:
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # [V]
        dist = p[i] if residual.sum() <= RESIDUAL_EPS else residual
        return out + [inverse_cdf_sample(dist[None], u[gamma : gamma + 1]).item()]
    return out + [inverse_cdf_sample(p[gamma][None], u[gamma : gamma + 1]).item()]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 5), gamma=st.integers(0, 4), v=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_rejection_matches_python_reference(b: int, gamma: int, v: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(b, gamma + 1, v, generator=gen), -1)  # [B, gamma+1, V]
    p = p * (torch.rand(b, gamma + 1, v, generator=gen) > 0.3)  # zeros; all-zero rows made valid below
    p[..., 0] += 1e-3
    q = torch.softmax(torch.randn(b, gamma, v, generator=gen) * 3, -1)  # [B, gamma, V]
    q = q * (torch.rand(b, gamma, v, generator=gen) > 0.3)  # q(d) may be 0 (adversarial)
    draft = torch.randint(0, v, (b, gamma), generator=gen)  # [B, gamma]
    draft[::2] = p[::2, :gamma].argmax(-1)  # likely accepted: reach the bonus path too
    gens = [None if i == 1 else torch.Generator().manual_seed(seed + i) for i in range(b)]
    res = rejection_verify(draft, q, p, gens)
    for i in range(b):
        if gens[i] is None:
            want = reference_greedy(draft[i].tolist(), p[i].argmax(-1).tolist())
        else:
            want = reference_rejection(draft[i], q[i], p[i], torch.Generator().manual_seed(seed + i))
        assert res.tolist()[i] == want


def test_rejection_one_hot_target_is_exact() -> None:
    p = torch.zeros(64, 3, V)  # [B, gamma+1, V]
    p[:, :, 4] = 1.0
    q = torch.softmax(torch.randn(64, 2, V, generator=torch.Generator().manual_seed(0)), -1)  # [B, gamma, V]
    draft = torch.randint(0, V, (64, 2), generator=torch.Generator().manual_seed(1))  # [B, gamma]
    res = rejection_verify(draft, q, p, [torch.Generator().manual_seed(2)] * 64)
    expected = [reference_greedy(d, [4, 4, 4]) for d in draft.tolist()]
    assert res.tolist() == expected


def test_mixed_batch_greedy_rows_follow_greedy_rule() -> None:
    logits = torch.randn(4, 3, V, generator=torch.Generator().manual_seed(0))  # [B, gamma+1, V]
    draft = logits[:, :2].argmax(-1)  # [B, gamma]
    draft[1, 1] = (draft[1, 1] + 1) % V
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.8])  # [B]
    gens = [None, None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    q = torch.full((4, 2, V), 1.0 / V)  # [B, gamma, V]
    res = mixed_verify(draft, q, logits, temperature, torch.ones(4), torch.zeros(4, dtype=torch.int64), gens)
    greedy = greedy_verify(draft, logits)
    row1 = [draft[1, 0].item(), logits[1, 1].argmax().item()]
    assert res.tolist()[:2] == greedy.tolist()[:2] == [logits[0].argmax(-1).tolist(), row1]
    assert res.num_output[2:].ge(1).all() and res.output_ids.shape == (4, 3)
    with pytest.raises(ValueError, match="generator"):
        mixed_verify(
            draft, q, logits, temperature, torch.ones(4), torch.zeros(4, dtype=torch.int64), [None] * 4
        )


def test_seeded_verification_reproduces() -> None:
    p = torch.softmax(torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0)), -1)  # [B, 4, V]
    q = torch.softmax(torch.randn(3, 3, 50, generator=torch.Generator().manual_seed(1)), -1)  # [B, 3, V]
    draft = p[:, :3].argmax(-1)  # [B, gamma]

    def run() -> list[list[int]]:
        gens = [make_generator(SamplingParams(temperature=1.0, seed=s)) for s in (7, 8, 9)]
        return [rejection_verify(draft, q, p, gens).tolist() for _ in range(4)]

    assert run() == run()


def test_scatter_to_target_vocab() -> None:
    small = torch.tensor([[0.2, 0.3, 0.5]])  # [1, Vd]
    out = scatter_to_target_vocab(small, torch.tensor([4, 0, 2]), 6)  # [1, V]
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.0, 0.5, 0.0, 0.2, 0.0]]))

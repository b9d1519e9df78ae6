"""Statistical losslessness of rejection_verify: the output must be distributed exactly as the target.

Model: target and draft are Markov tables over a V=6 vocabulary, p(.|prefix) = P[last token],
q(.|prefix) = Q[last token], so the target distribution depends on the prefix. Each trial drafts
gamma tokens from Q, verifies them once, and (if only one token came out) runs a second step, giving the
first two output tokens of a sequence. Checks use Pearson's chi-square (scipy.stats.chisquare) at
significance level ALPHA = 1e-4 per check (about 60 checks, so a family-wise
false-alarm rate <= 0.6%); cells with expected count < 5 are pooled, and tokens with zero target
mass must never appear (checked exactly). Every chi-square also asserts, via the noncentral chi-square,
that it has >= 90% power against moving 2% of probability mass between its two likeliest cells, and the
negative controls (wrong verifiers) must fail the same checks with p < ALPHA, so a pass is not vacuous.
All seeds are fixed: results are deterministic. The last section checks the sampling primitives
(staged top-k/top-p filter, two-level inverse CDF) against textbook full-sort / flat-CDF references.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats

from tide_trt.spec import VerifyResult, inverse_cdf_sample, logits_to_probs, rejection_verify

ALPHA = 1e-4  # per check; ~60 checks -> family-wise false-alarm rate <= 0.6% (Bonferroni)
V = 6
N_TRIALS = 50_000
PREFIX = 0  # last committed token of every trial
SHIFT = 0.02  # bias (probability mass) each chi-square must detect with >= MIN_POWER
MIN_POWER = 0.9

Verifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], VerifyResult]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


# ---------------------------------------------------------------- adversarial (p, q) pairs, one per table row
def _pair(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    half = rng.permutation(V)[: V // 2]  # a random half of the vocabulary
    if kind == "draft_mass_where_target_has_none":
        p[half] = 0.0
        q[half] *= 3.0
    elif kind == "target_mass_where_draft_has_none":
        q[half] = 0.0
    elif kind == "disjoint_support":
        p[half] = 0.0
        q[np.setdiff1d(np.arange(V), half)] = 0.0
    elif kind == "identical":
        q = p
    elif kind == "near_one_hot":
        p, q = np.full(V, 0.004), np.full(V, 0.004)
        p[rng.integers(V)] += 0.98
        q[rng.integers(V)] += 0.98
    elif kind != "random":
        raise ValueError(kind)
    return p / p.sum(), q / q.sum()


KINDS = [
    "random",
    "draft_mass_where_target_has_none",
    "target_mass_where_draft_has_none",
    "disjoint_support",
    "identical",
    "near_one_hot",
]


@functools.cache
def tables(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft Markov tables P, Q [V, V] (row = previous token)."""
    rng = np.random.default_rng(1234 + KINDS.index(kind))
    rows = [_pair(kind, rng) for _ in range(V)]
    p = torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.float32)  # [V, V]
    q = torch.tensor(np.stack([r[1] for r in rows]), dtype=torch.float32)  # [V, V]
    return p, q


# ---------------------------------------------------------------- simulation
def one_step(
    prefix: torch.Tensor, gamma: int, kind: str, verifier: Verifier, gen: torch.Generator
) -> VerifyResult:
    """Draft gamma tokens from Q after ``prefix`` [n] and verify them once against P."""
    p_tab, q_tab = tables(kind)
    chunk = [prefix]
    for _ in range(gamma):
        chunk.append(torch.multinomial(q_tab[chunk[-1]], 1, generator=gen).squeeze(-1))  # [n]
    chunk_t = torch.stack(chunk, dim=1)  # [n, gamma+1]
    draft_probs = q_tab[chunk_t[:, :gamma]]  # [n, gamma, V]
    target_probs = p_tab[chunk_t]  # [n, gamma+1, V]
    return verifier(chunk_t[:, 1:], draft_probs, target_probs, [gen] * len(prefix))


@functools.cache
def simulate(kind: str, gamma: int, verifier: Verifier = rejection_verify) -> dict[str, torch.Tensor]:
    """First two output tokens of N_TRIALS sequences (second from a new step if the first step gave one)."""
    gen = torch.Generator().manual_seed(1000 * gamma + KINDS.index(kind))
    res = one_step(torch.full((N_TRIALS,), PREFIX), gamma, kind, verifier, gen)
    first = res.output_ids[:, 0]  # [n]
    second = res.output_ids[:, 1] if gamma > 0 else torch.full_like(first, -1)  # [n]
    in_step = res.num_output >= 2  # [n]
    if bool((~in_step).any()):
        again = one_step(first[~in_step], gamma, kind, verifier, gen)
        second = second.clone()
        second[~in_step] = again.output_ids[:, 0]
    return {"first": first, "second": second, "in_step": in_step, "num_accepted": res.num_accepted}


# ---------------------------------------------------------------- chi-square with pooling and a power check
def chi2_pvalue(groups: list[tuple[np.ndarray, np.ndarray]], check_power: bool = True) -> float:
    """groups: (observed counts [K], target probs [K]) per conditioning event; one pooled chi-square.

    Also asserts the test's power (noncentral chi-square) against moving SHIFT of the total probability
    mass between its two likeliest cells.
    """
    obs_all: list[float] = []
    exp_all: list[float] = []
    n_groups = 0
    for obs, probs in groups:
        n, probs = obs.sum(), probs / probs.sum()
        assert obs[probs == 0].sum() == 0, "a token with zero target probability was produced"
        exp = n * probs
        small, big = (exp < 5) & (probs > 0), exp >= 5
        obs_g, exp_g = list(obs[big]), list(exp[big])
        if small.any():
            obs_g.append(obs[small].sum())
            exp_g.append(exp[small].sum())
        if len(obs_g) >= 2:
            obs_all += obs_g
            exp_all += exp_g
            n_groups += 1
    assert n_groups > 0, "nothing to test"
    obs_arr, exp_arr = np.array(obs_all), np.array(exp_all)
    total = exp_arr.sum()
    top = np.sort(exp_arr / total)[::-1]
    df = len(exp_arr) - n_groups
    noncentrality = total * (SHIFT**2 / top[0] + SHIFT**2 / top[1])
    power = stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, noncentrality)
    assert power >= MIN_POWER or not check_power, (
        f"too few trials: power {power:.3f} against a {SHIFT} mass shift"
    )
    return float(stats.chisquare(obs_arr, exp_arr, ddof=n_groups - 1).pvalue)


def counts(tokens: torch.Tensor) -> np.ndarray:
    return np.bincount(tokens.numpy(), minlength=V).astype(np.float64)  # [V]


def first_token_pvalue(sim: dict[str, torch.Tensor], kind: str) -> float:
    p_tab, _ = tables(kind)
    return chi2_pvalue([(counts(sim["first"]), p_tab[PREFIX].double().numpy())])


def joint_pvalue(sim: dict[str, torch.Tensor], kind: str, mask: torch.Tensor | None = None) -> float:
    """Second token conditioned on the first: one chi-square over all (first = a) groups."""
    p_tab, _ = tables(kind)
    first, second = sim["first"], sim["second"]
    if mask is not None:
        first, second = first[mask], second[mask]
    groups = [(counts(first), p_tab[PREFIX].double().numpy())] if mask is None else []
    groups += [(counts(second[first == a]), p_tab[a].double().numpy()) for a in range(V)]
    return chi2_pvalue(groups, check_power=mask is None)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_first_output_token_is_target_distributed(kind: str, gamma: int) -> None:
    assert first_token_pvalue(simulate(kind, gamma), kind) > ALPHA


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_second_output_token_given_first_is_target_distributed(kind: str, gamma: int) -> None:
    sim = simulate(kind, gamma)
    assert joint_pvalue(sim, kind) > ALPHA  # (first, second) of the sequence, across steps
    if int(sim["in_step"].sum()) > 0:  # both tokens from the same verification step
        assert joint_pvalue(sim, kind, mask=sim["in_step"]) > ALPHA


@pytest.mark.parametrize("kind", KINDS)
def test_acceptance_rate_equals_overlap(kind: str) -> None:
    """P(first draft accepted) = sum_x min(p(x), q(x)); identical distributions accept everything."""
    sim = simulate(kind, 2)
    p_tab, q_tab = tables(kind)
    overlap = float(torch.minimum(p_tab[PREFIX], q_tab[PREFIX]).sum().clamp(max=1.0))
    accepted = int((sim["num_accepted"] >= 1).sum())
    if kind == "identical":
        assert sim["num_accepted"].eq(2).all()
    elif kind == "disjoint_support":
        assert accepted == 0
    else:
        assert stats.binomtest(accepted, N_TRIALS, overlap).pvalue > ALPHA


def one_hot_drafts(draft_ids, draft_probs, target_probs, generators) -> VerifyResult:
    """draft_probs=None: q is taken as one-hot at each draft, which is lossless whatever chose the draft."""
    return rejection_verify(draft_ids, None, target_probs, generators)


@pytest.mark.parametrize("kind", ["random", "near_one_hot"])
def test_drafts_without_draft_probs_are_lossless(kind: str) -> None:
    sim = simulate(kind, 2, one_hot_drafts)
    assert first_token_pvalue(sim, kind) > ALPHA
    assert joint_pvalue(sim, kind) > ALPHA


# ---------------------------------------------------------------- negative controls: wrong verifiers fail
def accept_always(draft_ids, draft_probs, target_probs, generators) -> VerifyResult:
    """Wrong: keeps every draft (output follows q, not p)."""
    return rejection_verify(draft_ids, draft_probs, torch.ones_like(target_probs), generators)


def recover_from_target(draft_ids, draft_probs, target_probs, generators) -> VerifyResult:
    """Wrong: correct acceptance test, but the recovered token comes from p instead of max(0, p - q)."""
    res = rejection_verify(draft_ids, draft_probs, target_probs, generators)
    rows = torch.arange(len(draft_ids))
    rejected = res.num_accepted < draft_ids.shape[1]  # [B]
    p_k = target_probs[rows, res.num_accepted]  # [B, V]
    resampled = torch.multinomial(p_k, 1, generator=generators[0]).squeeze(-1)  # [B]
    out = res.output_ids.clone()
    out[rows[rejected], res.num_accepted[rejected]] = resampled[rejected]
    return VerifyResult(out, res.num_output, res.num_accepted)


def bonus_from_wrong_slot(draft_ids, draft_probs, target_probs, generators) -> VerifyResult:
    """Wrong: the bonus token is sampled from p[:, gamma-1] (off by one) instead of p[:, gamma]."""
    shifted = target_probs.clone()
    shifted[:, -1] = target_probs[:, -2]
    return rejection_verify(draft_ids, draft_probs, shifted, generators)


def slightly_wrong(draft_ids, draft_probs, target_probs, generators) -> VerifyResult:
    """Wrong by ~2% mass: a random fraction of rows use accept_always, moving the first-token
    distribution to (1 - f) p + f q, i.e. a total-variation shift of f * TV(p, q) = SHIFT."""
    p_tab, q_tab = tables("random")
    frac = SHIFT / float(0.5 * (p_tab[PREFIX] - q_tab[PREFIX]).abs().sum())
    right = rejection_verify(draft_ids, draft_probs, target_probs, generators)
    wrong = accept_always(draft_ids, draft_probs, target_probs, generators)
    use_wrong = torch.rand(len(draft_ids), generator=generators[0]) < frac  # [B]
    rows = use_wrong.unsqueeze(-1)  # [B, 1]
    return VerifyResult(
        output_ids=torch.where(rows, wrong.output_ids, right.output_ids),
        num_output=torch.where(use_wrong, wrong.num_output, right.num_output),
        num_accepted=torch.where(use_wrong, wrong.num_accepted, right.num_accepted),
    )


@pytest.mark.parametrize("wrong", [accept_always, recover_from_target, slightly_wrong])
def test_negative_control_first_token(wrong: Verifier) -> None:
    assert first_token_pvalue(simulate("random", 1, wrong), "random") < ALPHA


def test_negative_control_second_token() -> None:
    sim = simulate("random", 1, bonus_from_wrong_slot)
    assert first_token_pvalue(sim, "random") > ALPHA  # the first token is still right ...
    assert joint_pvalue(sim, "random") < ALPHA  # ... the second is caught


# ---------------------------------------------------------------- sampling primitives vs textbook references
def reference_filter(logits: torch.Tensor, t: float, top_p: float, top_k: int) -> torch.Tensor:
    """Full-sort top-k then top-p (the textbook rule) -> probs [N, V]."""
    x = logits / t  # [N, V]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [N, V]
    ranks = torch.arange(x.shape[-1])  # [V]
    drop = ranks >= (top_k if top_k > 0 else x.shape[-1])  # [V]
    sorted_p = torch.softmax(sorted_x.masked_fill(drop, -math.inf), -1)  # [N, V]
    drop = drop | (torch.cumsum(sorted_p, -1) - sorted_p >= top_p) & (top_p < 1)  # [N, V]
    drop = torch.zeros_like(drop).scatter_(-1, order, drop & (ranks > 0))  # [N, V]
    return torch.softmax(x.masked_fill(drop, -math.inf), -1)


@pytest.mark.parametrize(
    ("t", "top_p", "top_k"), [(1.0, 0.9, 0), (0.3, 0.95, 0), (5.0, 0.99, 0), (1.0, 0.9, 300)]
)
def test_filter_matches_full_sort(t: float, top_p: float, top_k: int) -> None:
    """Rows whose top-p set needs 256, 4096 or all 5000 candidates give the full-sort answer."""
    logits = torch.randn(12, 5000, generator=torch.Generator().manual_seed(0))  # [N, V]
    logits[:4] *= 8.0  # peaked rows: final at the first stage
    got = logits_to_probs(logits, *(torch.full((12,), x) for x in (t, top_p, top_k)))
    want = reference_filter(logits, t, top_p, top_k)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want)


def test_inverse_cdf_two_level_matches_flat_cdf() -> None:
    gen = torch.Generator().manual_seed(0)
    dist = torch.rand(3000, 1000, generator=gen) ** 4  # [N, V] unnormalised
    dist[:, 200:500] = 0.0  # whole zero blocks
    dist[dist < 0.01] = 0.0  # scattered zeros
    u = torch.rand(3000, generator=gen)  # [N]
    cdf = torch.cumsum(dist.double(), -1)  # [N, V]
    want = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    for block in (16, 37, 256, 1000):
        got = inverse_cdf_sample(dist, u, block=block)
        assert torch.equal(got, want)
        assert dist.gather(1, got.unsqueeze(-1)).gt(0).all()
    edge = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]])  # [1, V]: u -> 1 must not return a zero-mass token
    assert inverse_cdf_sample(edge, torch.tensor([1.0 - 2**-24]), block=2).item() == 3

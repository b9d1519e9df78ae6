"""verify_flat (the step loop's verification on flat logits) equals the padded reference, mixed_verify, token for
token: greedy and sampled rows, draft lengths 0..γmax, rows without logits, deterministic and sampled drafts, the
same uniforms drawn from the same per-request generators."""

from __future__ import annotations

import pytest
import torch

from tide_trt.spec.flat_verify import FlatLayout, verify_flat
from tide_trt.spec.sampling import SamplingBatch, SamplingParams, logits_to_probs, make_generator
from tide_trt.spec.verify import mixed_verify

V = 40
GMAX = 4


def _case(seed: int, sampled_share: float, draft_q: bool):
    """Rows: (γᵢ, logits) — verification rows γᵢ = 0..GMAX, a completed prompt (γ 0, 1 logit), a chunk (0 logits)."""
    g = torch.Generator().manual_seed(seed)
    kinds = [(int(torch.randint(0, GMAX + 1, (1,), generator=g)), True) for _ in range(7)] + [(0, True), (0, False)]
    perm = torch.randperm(len(kinds), generator=g).tolist()
    kinds = [kinds[i] for i in perm]
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=12, seed=seed * 100 + i)
              if float(torch.rand(1, generator=g)) < sampled_share else SamplingParams() for i in range(len(kinds))]
    counts = [gam + 1 if has else 0 for gam, has in kinds]
    m = sum(counts)
    logits = torch.randn(m, V, generator=g) * 3  # [M, V]
    q = torch.softmax(torch.randn(m, V, generator=g) * 2, -1) if draft_q else None  # [M, V]
    drafts = torch.zeros(m, dtype=torch.long)
    is_draft = torch.zeros(m, dtype=torch.bool)
    logit_row, cu = [], [0]
    for r, ((gam, _), n) in enumerate(zip(kinds, counts, strict=True)):
        lo = cu[-1]
        for j in range(gam):  # half the drafts are the target's argmax (accepted by greedy rows), half random
            drafts[lo + j] = (logits[lo + j].argmax() if torch.rand(1, generator=g) < 0.6
                              else torch.randint(0, V, (1,), generator=g)[0])
            is_draft[lo + j] = True
        logit_row += [r] * n
        cu.append(lo + n)
    layout = FlatLayout(torch.tensor(logit_row, dtype=torch.long), torch.tensor(cu), is_draft, drafts, tuple(cu))
    return kinds, params, counts, logits, q, layout


def _reference(kinds, params, counts, logits, q, layout) -> list[tuple[int, list[int]]]:
    """mixed_verify on the padded [K, γmax + 1, V] layout of the rows with logits (last logit repeated)."""
    rows = [r for r, n in enumerate(counts) if n > 0]
    cu = layout.host_logit_cu
    target = torch.stack([logits[[cu[r] + min(j, counts[r] - 1) for j in range(GMAX + 1)]] for r in rows])
    drafts = torch.stack([torch.cat([layout.draft_ids[cu[r]:cu[r] + kinds[r][0]],
                                     torch.zeros(GMAX - kinds[r][0], dtype=torch.long)]) for r in rows])
    draft_q = None
    if q is not None:
        draft_q = torch.zeros(len(rows), GMAX, V)
        for k, r in enumerate(rows):
            draft_q[k, :kinds[r][0]] = q[cu[r]:cu[r] + kinds[r][0]]
    ps = [params[r] for r in rows]
    res = mixed_verify(drafts, draft_q, target, torch.tensor([p.temperature for p in ps]),
                       torch.tensor([p.top_p for p in ps]), torch.tensor([p.top_k for p in ps]),
                       [make_generator(p) for p in ps], [kinds[r][0] for r in rows])
    return [(int(a), out) for a, out in zip(res.num_accepted.tolist(), res.tolist(), strict=True)]


def _flat(kinds, params, counts, logits, q, layout) -> list[tuple[int, list[int]]]:
    gens = [make_generator(p) if n > 0 else None for p, n in zip(params, counts, strict=True)]
    sampling = SamplingBatch.from_params(params, gens)
    packed = verify_flat(logits, layout, sampling, q).tolist()
    r_rows = len(kinds)
    acc, toks = packed[:r_rows], packed[r_rows:]
    cu = layout.host_logit_cu
    return [(acc[r], toks[cu[r]:cu[r] + acc[r] + 1]) for r, n in enumerate(counts) if n > 0]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("sampled_share", "draft_q"), [(0.0, False), (0.5, False), (0.6, True), (1.0, True)])
def test_verify_flat_equals_the_padded_reference(seed: int, sampled_share: float, draft_q: bool) -> None:
    case = _case(seed, sampled_share, draft_q)
    assert _flat(*case) == _reference(*case)


def test_the_cases_accept_and_reject() -> None:
    """The comparison has power: over the cases, greedy and sampled rows both accept some drafts and reject
    others, and sampled rows draw recovered tokens that are not the argmax."""
    accepted = rejected = not_argmax = 0
    for seed in range(12):
        kinds, params, counts, logits, q, layout = _case(seed, 0.5, True)
        for (acc, toks), r in zip(_flat(kinds, params, counts, logits, q, layout),
                                  [r for r, n in enumerate(counts) if n > 0], strict=True):
            accepted += acc
            rejected += acc < kinds[r][0]
            last = layout.host_logit_cu[r] + acc
            not_argmax += toks[-1] != int(logits[last].argmax())
    assert accepted > 10 and rejected > 10 and not_argmax > 3, (accepted, rejected, not_argmax)


def test_sampled_rows_use_the_processed_target_law() -> None:
    """A γ = 0 sampled row draws exactly what plain sampling draws: inverse CDF of the processed law, one
    uniform from the request's generator."""
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3))
    layout = FlatLayout(torch.zeros(1, dtype=torch.long), torch.tensor([0, 1]), torch.zeros(1, dtype=torch.bool),
                        torch.zeros(1, dtype=torch.long), (0, 1))
    got = verify_flat(logits, layout, SamplingBatch.from_params([params], [make_generator(params)])).tolist()
    probs = logits_to_probs(logits, torch.tensor([0.7]), torch.tensor([0.9]), torch.tensor([0]))
    u = torch.rand((1, 1), generator=make_generator(params))[0, 0]
    want = int(torch.searchsorted(torch.cumsum(probs[0].double(), 0), u.double() * probs[0].double().sum(),
                                  right=True))
    assert got == [0, want]

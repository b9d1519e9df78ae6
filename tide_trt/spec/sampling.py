"""Per-request sampling parameters, logits -> probabilities, and reproducible sampling.

Pure tensor functions (no Triton / TensorRT). Every random draw goes through a per-request
``torch.Generator`` and the inverse-CDF rule in :func:`inverse_cdf_sample`, so a seeded request
reproduces its tokens and ``gamma == 0`` verification draws exactly like :func:`sample_from_probs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tide_trt.errors import RequestError

logger = logging.getLogger(__name__)

_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns target logits into tokens."""

    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0  # (0, 1]; 1 -> disabled
    top_k: int = 0  # 0 -> disabled
    seed: int | None = None  # None -> non-reproducible random stream

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise RequestError naming the bad field."""
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise RequestError(f"top_p must be a finite number in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = disabled), got {k!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _MAX_SEED):
            raise RequestError(f"seed must be an integer in [0, 2**64 - 1] or null, got {s!r}")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for a sampled request (seeded if ``params.seed`` is set); None for greedy."""
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def params_to_tensors(
    params: Sequence[SamplingParams], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-row params into (temperature [N] f32, top_p [N] f32, top_k [N] i64) for logits_to_probs."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)  # [N]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)  # [N]
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)  # [N]
    return temperature, top_p, top_k


@dataclass
class SamplingBatch:
    """One step's sampling parameters, built once per step (`from_params`) and read by both the drafter and the
    verification: per row temperature / top-p / top-k on the step's device and the row's generator (None: greedy
    row, or a row that draws nothing this step)."""

    temperature: torch.Tensor  # [R] float32
    top_p: torch.Tensor  # [R] float32
    top_k: torch.Tensor  # [R] int64
    generators: list[torch.Generator | None]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                    device: torch.device | str = "cpu") -> SamplingBatch | None:
        """None when every row is greedy (nothing to sample)."""
        if all(g is None for g in generators):
            return None
        temperature, top_p, top_k = params_to_tensors(params, device)
        return cls(temperature, top_p, top_k, list(generators))

    def select(self, rows: Sequence[int]) -> SamplingBatch | None:
        """The listed rows (e.g. the rows a draft head drafts for); None when all of them are greedy."""
        gens = [self.generators[r] for r in rows]
        if all(g is None for g in gens):
            return None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.temperature.device)  # [B]
        return SamplingBatch(self.temperature[index], self.top_p[index], self.top_k[index], gens)


def logits_to_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Per-row temperature, then top-k, then top-p (each renormalised) -> probs [N, V] float32.

    Rows with temperature <= 0 become one-hot at ``argmax(logits)`` (first index on ties).
    top-p keeps the token at sorted rank r iff the mass of ranks < r is < top_p (the smallest prefix
    reaching top_p); top_p >= 1 and top_k <= 0 or >= V disable the filter. The top token is always kept.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n, v = logits.shape
    x = logits.float()  # [N, V]
    temperature = temperature.to(x.device, torch.float32).reshape(n)  # [N]
    top_p = top_p.to(x.device, torch.float32).reshape(n)  # [N]
    top_k = top_k.to(x.device, torch.int64).reshape(n)  # [N]
    greedy = temperature <= 0  # [N]
    greedy_ids = x.argmax(-1, keepdim=True) if bool(greedy.any()) else None  # [N, 1]
    # shift by the row max before dividing: a tiny temperature cannot overflow to inf / NaN
    x = (x - x.max(-1, keepdim=True).values) / torch.where(greedy, 1.0, temperature).unsqueeze(-1)  # [N, V]

    use_k = (top_k > 0) & (top_k < v) & ~greedy  # [N]
    use_p = (top_p < 1) & ~greedy  # [N]
    rows = (use_k | use_p).nonzero().squeeze(-1)  # [F]
    if rows.numel() > 0:
        k_eff = torch.where(use_k, top_k, torch.full_like(top_k, v))[rows]  # [F]
        p_eff = torch.where(use_p, top_p, torch.full_like(top_p, 2.0))[rows]  # [F]; > 1 = disabled
        x[rows] = _filter_top_k_top_p(x[rows], k_eff, p_eff)
    probs = torch.softmax(x, dim=-1)  # [N, V]
    if greedy_ids is not None:
        one_hot = torch.zeros_like(probs).scatter_(-1, greedy_ids, 1.0)  # [N, V]
        probs = torch.where(greedy.unsqueeze(-1), one_hot, probs)
    return probs


def _filter_top_k_top_p(x: torch.Tensor, k_eff: torch.Tensor, p_eff: torch.Tensor) -> torch.Tensor:
    """x [F, V] -> x with filtered logits set to -inf; k_eff [F] in 1..V, p_eff [F] (> 1 = no top-p).

    Works on the K largest logits (K = 256, then 4096, then V): a row is final at stage K when its
    top-k fits in K, or when the top K tokens already hold its top_p mass, so the result equals a full sort.
    """
    n, v = x.shape
    out = torch.full_like(x, -math.inf)  # [F, V]
    todo = torch.arange(n, device=x.device)  # [T] rows not yet final
    for stage in (min(256, int(k_eff.max())), 4096, v):
        k_cand = min(stage, v)
        xs, ks, ps = x[todo], k_eff[todo], p_eff[todo]  # [T, V], [T], [T]
        vals, idx = torch.topk(xs, k_cand, dim=-1)  # [T, K] descending
        ranks = torch.arange(k_cand, device=x.device).unsqueeze(0)  # [1, K]
        drop = ranks >= ks.unsqueeze(-1)  # [T, K]
        k_inside = ks <= k_cand  # [T]: top-k renormalisation is computable from the candidates
        lse = torch.where(
            k_inside, torch.logsumexp(vals.masked_fill(drop, -math.inf), -1), torch.logsumexp(xs, -1)
        )  # [T]
        probs = torch.exp(vals - lse.unsqueeze(-1)).masked_fill(drop, 0.0)  # [T, K]
        cum = torch.cumsum(probs, dim=-1)  # [T, K]
        drop = (drop | ((cum - probs) >= ps.unsqueeze(-1))) & (ranks > 0)  # [T, K]
        final = k_inside | (cum[:, -1] >= ps) | (k_cand == v)  # [T]
        kept = torch.full_like(xs, -math.inf).scatter_(-1, idx, vals.masked_fill(drop, -math.inf))  # [T, V]
        out[todo[final]] = kept[final]
        todo = todo[~final]
        if todo.numel() == 0:
            break
    return out


def draw_uniforms(
    generators: Sequence[torch.Generator | None], width: int, device: torch.device | str
) -> torch.Tensor:
    """Uniform [0, 1) draws [N, width] float32 on ``device``; row i from generators[i] (NaN where None).

    Each distinct generator object draws once, ``torch.rand(rows, width)``, in row order, so a request
    that owns its generator consumes exactly ``width`` numbers per call whatever the batch looks like.
    A generator may appear on several rows (e.g. one shared generator for many trials).
    """
    if not generators:
        return torch.empty((0, width), dtype=torch.float32, device=device)
    return draw_uniforms_ragged(generators, [width] * len(generators), device)


def draw_uniforms_ragged(
    generators: Sequence[torch.Generator | None], widths: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """Uniform draws [N, max(widths)] float32; row i takes widths[i] numbers from generators[i] (NaN elsewhere).

    A generator whose rows all have the same width draws exactly as :func:`draw_uniforms` (one
    ``torch.rand(rows, width)``), so a request consumes the same numbers whatever the batch looks like.
    """
    n = len(generators)
    width = max(widths) if n else 0
    out = torch.full((n, width), math.nan, dtype=torch.float32, device=device)  # [N, W]
    groups: dict[int, tuple[torch.Generator, list[int]]] = {}
    for row, gen in enumerate(generators):
        if gen is not None:
            groups.setdefault(id(gen), (gen, []))[1].append(row)
    for gen, rows in groups.values():
        ws = [int(widths[r]) for r in rows]
        if all(w == ws[0] for w in ws):
            u = torch.rand((len(rows), ws[0]), generator=gen, device=gen.device).to(device)  # [rows, w]
            out[torch.tensor(rows, dtype=torch.int64, device=device), : ws[0]] = u
            continue
        flat = torch.rand(sum(ws), generator=gen, device=gen.device).to(device)  # [sum w]
        offset = 0
        for r, w in zip(rows, ws, strict=True):
            out[r, :w] = flat[offset:offset + w]
            offset += w
    return out


def _last_positive(w: torch.Tensor) -> torch.Tensor:
    """Index of the last entry > 0 of each row of w [N, M] (M - 1 for an all-zero row) -> [N]."""
    m = w.shape[-1]
    pos = torch.arange(1, m + 1, device=w.device)  # [M]
    return ((w > 0) * pos).max(-1).values.sub(1).clamp(min=0).where((w > 0).any(-1), m - 1)


def inverse_cdf_sample(dist: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Token ids [N] int64 from unnormalised non-negative weights dist [N, V] and uniforms u [N].

    Returns the first index whose float64 CDF exceeds ``u * total`` (two levels: blocks of ``block``
    tokens, then tokens inside the chosen block). A zero-weight token is never returned (unless the
    whole row is zero, which is invalid input).
    """
    n, v = dist.shape
    block = min(block, v)
    nb = -(-v // block)
    w = dist if nb * block == v else torch.nn.functional.pad(dist, (0, nb * block - v))  # [N, nb*block]
    blocks = w.view(n, nb, block)  # [N, nb, block]
    block_mass = blocks.sum(-1, dtype=torch.float64)  # [N, nb]
    block_cdf = torch.cumsum(block_mass, dim=-1)  # [N, nb]
    x = u.double() * block_cdf[:, -1]  # [N]
    b = torch.searchsorted(block_cdf, x.unsqueeze(-1), right=True).squeeze(-1)  # [N]
    b = torch.minimum(b, _last_positive(block_mass)).unsqueeze(-1)  # [N, 1]
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)  # [N, 1]
    inner = blocks.gather(1, b.unsqueeze(-1).expand(n, 1, block)).squeeze(1)  # [N, block]
    inner_cdf = torch.cumsum(inner.double(), dim=-1)  # [N, block]
    j = torch.searchsorted(inner_cdf, x.unsqueeze(-1) - before, right=True).squeeze(-1)  # [N]
    j = torch.minimum(j, _last_positive(inner))  # [N]
    return (b.squeeze(-1) * block + j).clamp(max=v - 1)


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Token ids [N] int64 from probs [N, V]; row i draws one uniform from generators[i], None -> argmax."""
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"probs must be [N, V] with N == len(generators), got {tuple(probs.shape)}")
    tokens = probs.argmax(-1)  # [N]
    sampled = torch.tensor([g is not None for g in generators], dtype=torch.bool, device=probs.device)  # [N]
    if bool(sampled.any()):
        u = draw_uniforms(generators, 1, probs.device).squeeze(-1)  # [N]
        drawn = inverse_cdf_sample(probs.clamp(min=0), torch.nan_to_num(u, nan=0.0))  # [N]
        tokens = torch.where(sampled, drawn, tokens)
    return tokens

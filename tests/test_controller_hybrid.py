"""The adaptive controller with a hybrid drafter (EAGLE-3 head + suffix index): the head's γ follows the head's own
acceptance (index rows are kept out of α), the index keeps drafting its confident rows while the head is off
(index steps, with truly plain probes between them), and the index's own live guard turns it off where its steps
lose to plain ones and back on later. Pure simulations with injected step times, then the real default model."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_engine
from tests.test_controller import PROFILE, sample_accepted
from tide_trt.config import ControllerConfig, SuffixConfig
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma
from tide_trt.online.control_plugin import ControllerPlugin
from tide_trt.online.controller import AdaptiveController
from tide_trt.runtime import encode_prompt, run_with_policy

HEAD_ALPHA = 0.1  # a head that does not pay anywhere on PROFILE
INDEX_ALPHA = 0.9  # the index where it is confident
INDEX_GAMMA = 4


def _simulate(cfg: ControllerConfig, steps: int = 900, slow_index: tuple[int, int] | None = None,
              seed: int = 0) -> tuple[AdaptiveController, list[str]]:
    """One request at batch 1. A head row accepts with HEAD_ALPHA; on steps where `index_off_rows()` allows it the
    row is an index row (INDEX_GAMMA drafts at INDEX_ALPHA, no draft cost). Step times are the profile's, index steps
    6 times slower inside `slow_index` = (start, end). Returns the controller and each step's kind."""
    rng = random.Random(seed)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    kinds = []
    for t in range(steps):
        g = ctl.choose_gamma(["r"])
        index = ctl.index_off_rows() and g == 0
        if index:
            gi = INDEX_GAMMA
            acc = sample_accepted(rng, INDEX_ALPHA, gi)
            sec = ctl.cost.prior_step_seconds(gi + 1, 0, 0)
            if slow_index is not None and slow_index[0] <= t < slow_index[1]:
                sec *= 6.0  # index goodput ~0.6x plain (4.1 tokens per 5-token step otherwise)
            ctl.observe(["r"], [gi], [acc], sec, head_rows=0, index_rows={"r"})
            kinds.append("index")
        else:
            acc = sample_accepted(rng, HEAD_ALPHA, g)
            ctl.observe(["r"], [g], [acc], ctl.cost.prior_step_seconds(g + 1, g, 1 if g else 0), index_rows=set())
            kinds.append("head" if g else "plain")
    return ctl, kinds


def test_index_drafts_while_the_head_is_off_with_plain_probes_between() -> None:
    ctl, kinds = _simulate(ControllerConfig())
    snap = ctl.snapshot()
    assert snap.committed_gamma == 0  # the head does not pay ...
    assert snap.global_alpha < 0.3  # ... and its α is its own: the index's 0.9 is kept out of it
    assert snap.index_drafting and snap.index_accepted_per_token is not None
    assert snap.index_accepted_per_token > 0.6
    tail = kinds[100:]
    assert tail.count("index") >= 0.85 * len(tail), tail[:40]
    assert "plain" in tail  # plain probes: the index guard's live plain goodput
    assert snap.index_measured_speedup is not None and snap.index_measured_speedup > 1.2


def test_index_rows_do_not_turn_the_head_on() -> None:
    """Counted as head acceptance, the index's rows would raise α until the head switches on; kept apart, the head
    stays off (it is the head's γ the controller decides)."""
    ctl, kinds = _simulate(ControllerConfig(), steps=600)
    assert kinds[200:].count("head") <= 0.1 * 400
    assert ctl.snapshot().committed_gamma == 0


def test_index_guard_turns_index_steps_off_under_a_slowdown_and_back_on() -> None:
    cfg = ControllerConfig()
    start, end = 300, 700
    ctl, kinds = _simulate(cfg, steps=1300, slow_index=(start, end))
    assert kinds[100:start].count("index") >= 0.85 * (start - 100)
    first_plain_run = next(t for t in range(start, end) if kinds[t:t + 16] == ["plain"] * 16)
    assert first_plain_run - start <= cfg.guard_window_steps, first_plain_run
    during = kinds[first_plain_run:end]
    assert during.count("index") <= 0.35 * len(during)  # re-measured now and then, mostly plain
    assert ctl.snapshot().index_offs >= 1
    back = next(t for t in range(end, len(kinds)) if kinds[t:t + 8] == ["index"] * 8)
    assert back - end <= 4 * cfg.reprobe_interval_steps + cfg.guard_window_steps, back
    assert kinds[-200:].count("index") >= 0.85 * 200


@pytest.mark.parametrize("cfg", [ControllerConfig(mode="static"), ControllerConfig(mode="off"),
                                 ControllerConfig(index_when_off=False)], ids=["static", "off", "disabled"])
def test_no_index_steps_outside_adaptive_mode_or_when_disabled(cfg: ControllerConfig) -> None:
    ctl, kinds = _simulate(cfg, steps=200)
    assert "index" not in kinds
    assert not ctl.snapshot().index_drafting


def test_plain_probes_are_truly_plain() -> None:
    """With the head off every step may index-draft except the plain probes (one in 16 index steps; a head probe's
    4 steps between them): the guard's plain samples are plain decoding."""
    ctl = AdaptiveController(ControllerConfig(), PROFILE, 8, 3)
    allowed = []
    for _ in range(300):
        g = ctl.choose_gamma(["r"])
        allowed.append(ctl.index_off_rows())
        ctl.observe(["r"], [g], [0], ctl.cost.prior_step_seconds(g + 1, g, 1 if g else 0))
    plain = [i for i, a in enumerate(allowed) if not a]
    assert len(plain) == ctl.snapshot().plain_probes >= 15
    assert {b - a for a, b in zip(plain, plain[1:], strict=False)} <= {16, 16 + ControllerConfig().probe_steps}, plain


# ---- the real default model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_engine(default_checkpoint, default_tokenizer):
    from tide_trt.kernels import load_gemm_bf16w

    native = load_gemm_bf16w() is not None
    return make_engine(default_checkpoint, dtype="bfloat16" if native else "float32", max_batch_size=2,
                       max_seq_len=384, tokenizer=default_tokenizer, cpu_kernels="auto" if native else "off")


def _mismatched_hybrid(engine, default_draft_dir):
    from tide_trt.runtime import build_drafter

    drafter = build_drafter(engine, default_draft_dir, suffix=SuffixConfig(preload=""))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in drafter.head.parameters():
            p.normal_(0, 0.5)  # a head whose proposals are noise: the controller turns it off
    return drafter


def test_default_model_index_keeps_drafting_after_the_head_is_switched_off(default_engine, default_draft_dir) -> None:
    engine = default_engine
    drafter = _mismatched_hybrid(engine, default_draft_dir)

    def request(rid: str, text: str) -> GenerationRequest:
        return GenerationRequest(rid, encode_prompt(engine.tokenizer, text), 64,
                                 stop_token_ids=engine.info.eos_token_ids)

    poem = "Write a short poem about the sea."
    plain_gen = SpeculativeGenerator(engine, drafter)  # plain decoding; the finished answer joins the global index
    (plain,) = run_with_policy(plain_gen, [request("p", poem)], StaticGamma(0), []).sequences
    assert drafter.suffix is not None and drafter.suffix.sequences_indexed == 1
    plugin = ControllerPlugin(ControllerConfig(), PROFILE, 8, 3)
    gen = SpeculativeGenerator(engine, drafter)
    # a request the index knows nothing of: the cold-start probe measures the noisy head and turns it off
    run_with_policy(gen, [request("w", "Name three uses of copper.")], plugin, [plugin])
    assert plugin.state().committed_gamma == 0 and plugin.state().global_alpha < 0.3
    (served,) = run_with_policy(gen, [request("r", poem)], plugin, [plugin]).sequences  # served before
    assert served.output_ids == plain.output_ids  # lossless
    assert plugin.state().committed_gamma == 0  # the head stays off ...
    index = gen.draft_source_stats["index"]
    assert index["rows"] > 0 and index["accepted_tokens"] > 0.5 * index["draft_tokens"]  # ... the index is not
    assert served.mean_accepted_len > 4.0, served.mean_accepted_len  # index steps throughout (a probe alone: ~2)

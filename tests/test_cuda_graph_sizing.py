"""CUDA graphs of the torch engine cover the steps the configured `draft.gamma_max` makes: a full batch, each row
verifying γ_max drafts, within `engine.max_num_tokens` (issue 19, item 4: the engine read the class default, 8).

The sizing is checked on CPU, where no graph is captured: the number the engine holds is what decides which steps
replay a graph (`TorchTargetEngine._forward_static`)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from tide_trt.config import DraftConfig, EngineConfig, ModelConfig, TideConfig
from tide_trt.engine.torch_engine import TorchTargetEngine, graph_step_tokens
from tide_trt.runtime import build_engine

BATCH = 8


@pytest.fixture(autouse=True)
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny random checkpoint has no tokenizer files; token ids are all these tests need."""
    monkeypatch.setattr("tide_trt.engine.torch_engine.load_tokenizer", lambda path: None)


def _class_default_gamma_max() -> int:
    return next(f.default for f in fields(DraftConfig) if f.name == "gamma_max")  # type: ignore[return-value]


def _config(model_dir: Path, gamma_max: int, max_num_tokens: int = 4096) -> TideConfig:
    return TideConfig(model=ModelConfig(path=str(model_dir)),
                      engine=EngineConfig(dtype="float32", max_batch_size=BATCH, max_seq_len=64, cpu_kernels="off",
                                          max_num_tokens=max_num_tokens),
                      draft=DraftConfig(path="none", gamma_max=gamma_max))


def test_graph_step_tokens_is_a_full_batch_at_gamma_max_within_the_budget() -> None:
    cfg = EngineConfig(max_batch_size=BATCH, max_num_tokens=4096)
    assert graph_step_tokens(cfg, 0) == 64  # plain decoding: 8 tokens, one tile
    assert graph_step_tokens(cfg, 16) == 192  # 8 · 17 = 136 tokens -> 3 tiles
    assert graph_step_tokens(cfg, 32) == 320  # 8 · 33 = 264 -> 5 tiles
    assert graph_step_tokens(EngineConfig(max_batch_size=BATCH, max_num_tokens=100), 32) == 128  # the budget caps it
    with pytest.raises(Exception, match="gamma_max"):
        graph_step_tokens(cfg, -1)


@pytest.mark.parametrize("gamma_max", [16, 32])
def test_build_engine_sizes_graphs_from_the_configured_gamma_max(tiny_model_dir: Path, gamma_max: int) -> None:
    """The configured value, not DraftConfig's class default (8: 8 · 9 = 72 tokens -> 128), reaches the engine."""
    default = graph_step_tokens(EngineConfig(max_batch_size=BATCH, max_num_tokens=4096), _class_default_gamma_max())
    engine = build_engine(_config(tiny_model_dir, gamma_max))
    assert isinstance(engine, TorchTargetEngine)
    assert engine.graph_max_tokens == padded(BATCH * (gamma_max + 1)) != default


def test_the_token_budget_caps_the_graphs(tiny_model_dir: Path) -> None:
    engine = build_engine(_config(tiny_model_dir, 32, max_num_tokens=100))
    assert isinstance(engine, TorchTargetEngine)
    assert engine.graph_max_tokens == 128


def test_an_engine_built_directly_takes_gamma_max(tiny_checkpoint) -> None:
    cfg = EngineConfig(dtype="float32", max_batch_size=BATCH, max_seq_len=64, cpu_kernels="off",
                       max_num_tokens=4096)
    assert TorchTargetEngine(tiny_checkpoint, cfg).graph_max_tokens == 64  # plain decoding by default
    assert TorchTargetEngine(tiny_checkpoint, cfg, gamma_max=24).graph_max_tokens == padded(BATCH * 25)


def padded(tokens: int) -> int:
    return -(-tokens // 64) * 64

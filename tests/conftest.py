"""Shared fixtures: a tiny random Llama (fast) and the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from tests.oracle_draft import OracleDraft

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on shared machines OpenMP spinning on a busy core costs ~100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tide_trt.models.tiny import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir: Path):
    from tide_trt.models.loader import load_checkpoint

    return load_checkpoint(str(tiny_model_dir))


def make_engine(ckpt, dtype: str = "float32", max_batch_size: int = 8, max_seq_len: int = 256,
                tokenizer=None, cpu_kernels: str = "off", weights: str = "bf16"):
    """cpu_kernels="auto" with dtype bfloat16: bf16 weights, fp32 activations, native kernel (the CPU serving
    mode); "off": PyTorch matmuls end to end in `dtype`. weights "q4_1" / "q8_0" / "auto": engine.weights."""
    from tide_trt.config import EngineConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine

    return TorchTargetEngine(ckpt, EngineConfig(dtype=dtype, max_batch_size=max_batch_size,
                                                max_seq_len=max_seq_len, cpu_kernels=cpu_kernels,
                                                weights=weights), tokenizer)


@pytest.fixture()
def tiny_engine(tiny_checkpoint):
    return make_engine(tiny_checkpoint)


@pytest.fixture(scope="session")
def default_checkpoint():
    from tide_trt.models.loader import load_checkpoint

    return load_checkpoint("default")


@pytest.fixture(scope="session")
def default_tokenizer(default_checkpoint):
    from tide_trt.models.loader import load_tokenizer

    return load_tokenizer(default_checkpoint.path)


@pytest.fixture(scope="session")
def default_draft_dir() -> Path:
    from tide_trt.runtime import DEFAULT_DRAFT_DIR

    if not (DEFAULT_DRAFT_DIR / "model.safetensors").is_file():
        pytest.fail(f"the shipped default draft is missing at {DEFAULT_DRAFT_DIR}")
    return DEFAULT_DRAFT_DIR


def random_prompts(n: int, vocab: int, seed: int, min_len: int = 2, max_len: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n_,), generator=gen).tolist() for n_ in lengths]


@pytest.fixture(scope="session")
def tiny_oracle(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> OracleDraft:
    """An oracle EAGLE-3 draft for the tiny target (`tiny_checkpoint`): a real head overfitted on the target's own
    greedy continuations of the scheduler and refit tests' prompts (tests/oracle_draft.py), saved as a normal
    checkpoint. On those prompts it proposes what the target will emit, so τ is close to γ + 1."""
    from tests.oracle_draft import TINY_ORACLE_MAX_NEW, build_oracle_draft, tiny_oracle_prompts

    return build_oracle_draft(make_engine(tiny_checkpoint), tiny_oracle_prompts(), TINY_ORACLE_MAX_NEW,
                              tmp_path_factory.mktemp("tiny-oracle") / "draft", gamma=4)

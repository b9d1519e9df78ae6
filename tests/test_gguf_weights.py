"""GGUF-block weights (engine.weights q4_1 / q8_0): the native kernel's accuracy and batch invariance on both
instruction sets, reading the default model's own blocks, `auto`, quantizing on load, and the fallback without the
kernel."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.conftest import make_engine
from tide_trt.config import EngineConfig
from tide_trt.errors import ConfigError
from tide_trt.kernels import load_gemm_gguf
from tide_trt.models.gguf_weights import QuantWeight

kernel = load_gemm_gguf()
needs_kernel = pytest.mark.skipif(kernel is None, reason="GGUF kernel not buildable here (no AVX2 or compiler)")
ISAS = [True, False]  # allow AVX-512 (used where the CPU has it) / AVX2 only


def _fn(fmt: str):
    assert kernel is not None
    return kernel.linear_q4_1 if fmt == "q4_1" else kernel.linear_q8_0


def _weight(n: int, k: int, fmt: str, seed: int) -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    return QuantWeight.quantize(torch.randn(n, k, generator=g), fmt, "quantized:float32")  # type: ignore[arg-type]


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (7, 64), (961, 576), (577, 1536)])
@pytest.mark.parametrize("allow_avx512", ISAS)
def test_matches_float64_reference(fmt: str, n: int, k: int, allow_avx512: bool) -> None:
    w = _weight(n, k, fmt, n + k)
    ref_w = w.dequantize().double()  # [N, K]
    g = torch.Generator().manual_seed(n)
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, k, generator=g)  # [M, K]
        got = _fn(fmt)(x, w.blocks, k, allow_avx512)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert torch.allclose(got.double(), x.double() @ ref_w.t(), rtol=1e-5, atol=1e-4 * k**0.5)


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("allow_avx512", ISAS)
def test_batch_invariant_bitwise(fmt: str, allow_avx512: bool) -> None:
    """Row r of a batched call is bit-identical to the same row alone, in any other batch, on any thread count."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 576, generator=g)  # [M, K]
    w = _weight(1003, 576, fmt, 2)
    fn = _fn(fmt)
    full = fn(x, w.blocks, 576, allow_avx512)  # [M, N]
    for r in (0, 4, 22):
        assert torch.equal(fn(x[r : r + 1].contiguous(), w.blocks, 576, allow_avx512)[0], full[r])
    for lo, hi in ((3, 9), (1, 3), (5, 8)):
        assert torch.equal(fn(x[lo:hi].contiguous(), w.blocks, 576, allow_avx512), full[lo:hi])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fn(x, w.blocks, 576, allow_avx512), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_weights_are_the_exact_dequantized_values() -> None:
    """The kernel multiplies exactly the float32 dequantization (fma(q, d, m) rounds like d*q + m): against a float64
    product of those values the only error is float32 summation, far below any weight-value difference."""
    w = _weight(64, 256, "q4_1", 5)
    x = torch.zeros(1, 256)
    x[0, 37] = 1.0  # picks column 37 of every weight row, exactly
    assert torch.equal(kernel.linear_q4_1(x, w.blocks, 256)[0], w.dequantize()[:, 37])


@needs_kernel
def test_rejects_bad_inputs() -> None:
    w = _weight(4, 64, "q4_1", 0)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.linear_q4_1(torch.randn(2, 64, dtype=torch.float64), w.blocks, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.linear_q4_1(torch.randn(2, 48), w.blocks, 48)
    with pytest.raises(RuntimeError, match="blocks row"):
        kernel.linear_q8_0(torch.randn(2, 64), w.blocks, 64)  # Q4_1 rows are not Q8_0 rows
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.linear_q4_1(torch.randn(64, 2).t(), w.blocks, 64)


def test_config_rejects_quantized_weights_off_cpu() -> None:
    with pytest.raises(ConfigError, match="engine.weights"):
        EngineConfig(device="cuda", weights="q4_1")
    with pytest.raises(ConfigError, match="engine.weights must be one of"):
        EngineConfig(weights="q4_0")


@needs_kernel
def test_default_model_reads_the_files_blocks(default_checkpoint, caplog) -> None:
    """q4_1 on the default model: every layer linear is the file's Q4_1 blocks (Q and K rows back in Hugging Face
    order: the dequantized values equal the checkpoint's), the tied LM head the file's Q8_0 blocks; the logits are
    those of float32 weights (the same values) up to summation order; `auto` picks q4_1 and says why."""
    with caplog.at_level(logging.INFO, logger="tide_trt.engine.torch_engine"):
        eng = make_engine(default_checkpoint, dtype="bfloat16", max_batch_size=2, max_seq_len=64,
                          cpu_kernels="auto", weights="auto")
    assert "engine.weights auto -> q4_1" in caplog.text and "210 file:Q4_1, 1 file:Q8_0" in caplog.text
    assert eng.info.weights == "q4_1" and eng.info.native_linears and eng.info.activation_dtype == torch.float32
    layer = eng.weights.layers[7]
    qkv = layer["qkv"]
    assert isinstance(qkv, QuantWeight) and qkv.fmt == "q4_1" and qkv.source == "file:Q4_1"
    state = default_checkpoint.state
    p = "model.layers.7.self_attn."
    expect = torch.cat([state[p + "q_proj.weight"], state[p + "k_proj.weight"], state[p + "v_proj.weight"]])
    assert torch.equal(qkv.dequantize(), expect.float())
    head = eng.weights.lm_head
    assert isinstance(head, QuantWeight) and head.fmt == "q8_0" and head.source == "file:Q8_0"
    assert eng.weights.linear_bytes() < 100e6  # ~96 MB vs ~270 MB of bf16
    ref = make_engine(default_checkpoint, dtype="float32", max_batch_size=2, max_seq_len=64)
    prompt = list(range(100, 140))
    la = eng.forward([eng.allocate_slot()], [prompt]).logits[0, -1]  # [V]
    lb = ref.forward([ref.allocate_slot()], [prompt]).logits[0, -1]
    assert la.argmax() == lb.argmax() and torch.allclose(la, lb, atol=2e-3, rtol=1e-4)


@needs_kernel
def test_checkpoint_without_gguf_is_quantized_on_load(tiny_checkpoint, caplog) -> None:
    assert make_engine(tiny_checkpoint, weights="auto").info.weights == "bf16"  # nothing in the file to read
    with caplog.at_level(logging.WARNING, logger="tide_trt.engine.torch_engine"):
        eng = make_engine(tiny_checkpoint, weights="q8_0")
    assert "quantized on load" in caplog.text
    down = eng.weights.layers[0]["down"]
    assert isinstance(down, QuantWeight) and down.fmt == "q8_0" and down.source == "quantized:float32"
    ref = make_engine(tiny_checkpoint)
    prompt = list(range(3, 40))
    la = eng.forward([eng.allocate_slot()], [prompt]).logits[0, -1]
    lb = ref.forward([ref.allocate_slot()], [prompt]).logits[0, -1]
    assert (la - lb).abs().max() < 0.15 and la.argmax() == lb.argmax()  # 8-bit weights: close to float32
    assert not torch.equal(la, lb)


def test_without_the_kernel_quantized_weights_fall_back(tiny_checkpoint, monkeypatch, caplog) -> None:
    """No GGUF kernel (no compiler / AVX2): float32 copies of the same values through PyTorch, logged."""
    import tide_trt.kernels.linear as linear_mod

    monkeypatch.setattr(linear_mod, "load_gemm_gguf", lambda: None)
    with caplog.at_level(logging.WARNING, logger="tide_trt.engine.torch_engine"):
        eng = make_engine(tiny_checkpoint, weights="q4_1")
    assert "not available here" in caplog.text
    assert not eng.info.native_linears and eng.info.weights == "q4_1"
    w = eng.weights.layers[0]["o"]
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    expect = QuantWeight.quantize(tiny_checkpoint.state["model.layers.0.self_attn.o_proj.weight"], "q4_1", "")
    assert np.array_equal(w.numpy(), expect.dequantize().numpy())
    assert eng.forward([eng.allocate_slot()], [[1, 2, 3]]).logits.isfinite().all()


def test_cli_weights_flag_sets_engine_weights() -> None:
    import argparse

    from tide_trt.commands.common import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    assert config_from_args(p.parse_args(["--weights", "q4_1"])).engine.weights == "q4_1"
    assert config_from_args(p.parse_args([])).engine.weights == "bf16"

"""The native bf16-weight CPU kernel: accuracy against float64, batch invariance, and the engine wiring."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine
from tide_trt.kernels import load_gemm_bf16w
from tide_trt.kernels.linear import NativeLinear, linear, to_native_linears

kernel = load_gemm_bf16w()
pytestmark = pytest.mark.skipif(kernel is None, reason="native kernel not buildable here (no AVX2 or compiler)")


@pytest.mark.parametrize(("n", "k"), [(1, 8), (7, 64), (960, 576), (577, 1536)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17])
def test_matches_float64_reference(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g)  # [M, K]
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)  # [N, K]
    ref = x.double() @ w.double().t()  # [M, N]
    got = kernel.linear_bf16w(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4 * k**0.5)


def test_batch_invariant_bitwise() -> None:
    """Row r of a batched call is bit-identical to the same row computed alone or in any other batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 576, generator=g)
    w = torch.randn(1000, 576, generator=g).to(torch.bfloat16)
    full = kernel.linear_bf16w(x, w)
    for r in (0, 4, 22):
        assert torch.equal(kernel.linear_bf16w(x[r : r + 1].contiguous(), w)[0], full[r])
    assert torch.equal(kernel.linear_bf16w(x[3:9].contiguous(), w), full[3:9])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel.linear_bf16w(x, w), full)  # the thread split does not matter either
    finally:
        torch.set_num_threads(threads)


def test_rejects_bad_inputs() -> None:
    w = torch.randn(4, 16).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.linear_bf16w(torch.randn(2, 16, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernel.linear_bf16w(torch.randn(2, 12), torch.randn(4, 12).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.linear_bf16w(torch.randn(16, 2).t(), w)


def test_linear_dispatch_and_module_swap() -> None:
    x = torch.randn(2, 3, 16)  # [B, T, K]
    w = torch.randn(5, 16).to(torch.bfloat16)
    assert torch.allclose(linear(x, w), x @ w.float().t(), atol=1e-5)
    odd = torch.randn(2, 3, 12)
    w12 = torch.randn(5, 12).to(torch.bfloat16)
    assert torch.allclose(linear(odd, w12), odd @ w12.float().t(), atol=1e-5)  # odd width: PyTorch fallback
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 8, bias=False), torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    )
    ref = model(x)
    to_native_linears(model)
    assert isinstance(model[0], NativeLinear) and isinstance(model[1][0], NativeLinear)
    assert model[0].weight.dtype == torch.bfloat16
    assert torch.allclose(model(x), ref, atol=5e-2)


def test_default_engine_uses_the_kernel(default_checkpoint) -> None:
    engine = make_engine(default_checkpoint, dtype="bfloat16", max_batch_size=2, max_seq_len=64,
                         cpu_kernels="auto")
    assert engine.info.native_linears and engine.info.activation_dtype == torch.float32
    assert engine.weights.layers[0]["qkv"].dtype == torch.bfloat16 and engine.weights.lm_head.dtype == torch.bfloat16
    off = make_engine(default_checkpoint, dtype="bfloat16", max_batch_size=2, max_seq_len=64)
    assert not off.info.native_linears and off.weights.lm_head.dtype == torch.float32
    prompt = list(range(100, 140))
    a, b = engine.allocate_slot(), off.allocate_slot()
    la = engine.forward([a], [prompt]).logits[0, -1]
    lb = off.forward([b], [prompt]).logits[0, -1]
    assert la.argmax() == lb.argmax()  # same model, two numerics

"""`linear(x, w)`: the one matmul entry point of the serving models.

float32 activations with bfloat16 weights on CPU go to the native batch-invariant kernel (`gemm_bf16w.cpp`);
quantized weights (`QuantWeight`: a GGUF file's Q4_1 / Q8_0 blocks) to `gemm_gguf.cpp`, or, where that kernel cannot
be built, to PyTorch's float32 matmul on the dequantized values (the same numbers, not batch-invariant); everything
else (CUDA, float32 or bfloat16 end to end, training with autograd) is `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tide_trt.kernels import load_gemm_bf16w, load_gemm_gguf
from tide_trt.models.gguf_weights import QuantWeight


def native_linears_available() -> bool:
    return load_gemm_bf16w() is not None


def quant_kernel_available() -> bool:
    return load_gemm_gguf() is not None


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T -> [..., N]."""
    if isinstance(w, QuantWeight):
        return _linear_quant(x, w)
    if w.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % 8 == 0:
        kernel = load_gemm_bf16w()
        if kernel is None:
            raise RuntimeError("bfloat16 weights with float32 activations need the native CPU kernel")
        y = kernel.linear_bf16w(x.reshape(-1, x.shape[-1]).contiguous(), w)  # [M, N]
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w.to(x.dtype))  # a no-op cast unless an odd width left bf16 weights off the kernel


def _linear_quant(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """float32 x [..., K] @ the blocks' weight [N, K]^T -> float32 [..., N]."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()  # [M, K]
    kernel = load_gemm_gguf()
    if kernel is None:
        y = flat @ w.dequantize().t()  # [M, N]: the kernel's weights, PyTorch's summation order
    elif w.fmt == "q4_1":
        y = kernel.linear_q4_1(flat, w.blocks, w.in_features)
    else:
        y = kernel.linear_q8_0(flat, w.blocks, w.in_features)
    return y.view(*x.shape[:-1], w.out_features)


class NativeLinear(nn.Module):
    """Inference-only stand-in for a bias-free nn.Linear: bfloat16 weight, float32 activations, native kernel."""

    weight: torch.Tensor  # [N, K] bfloat16 buffer

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def to_native_linears(module: nn.Module) -> nn.Module:
    """Swap every bias-free nn.Linear child (recursively) for a NativeLinear holding its weight in bfloat16."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, NativeLinear(child.weight))
        else:
            to_native_linears(child)
    return module

"""Native CPU kernels, compiled on first use with PyTorch's C++ extension builder (needs a C++ compiler and
ninja; both are checked, and every caller falls back to plain PyTorch ops when the build is not possible).

`gemm_bf16w.cpp`: float32 activations x bfloat16 weights, AVX2/FMA, batch-invariant (see the file header).
`gemm_gguf.cpp`: float32 activations x a GGUF file's Q4_1 / Q8_0 blocks, dequantized in registers (AVX-512 or
AVX2), float32 math, batch-invariant.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("gemm_bf16w.cpp")
_GGUF_SOURCE = Path(__file__).with_name("gemm_gguf.cpp")


def cpu_supports_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.lru_cache(maxsize=1)
def fast_bf16_matmul() -> bool:
    """True on CUDA and on CPUs with native bf16 dot products (avx512_bf16 / amx_bf16); elsewhere bf16 matmuls
    run ~4x slower than float32, so training skips bf16 autocast."""
    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _build(name: str, source: Path, what: str, extra: list[str]) -> ModuleType | None:
    """Compile (or load the cached build of) one kernel module; None, with the reason logged, when not possible."""
    if os.environ.get("TIDE_DISABLE_NATIVE") == "1":
        log.info("native CPU kernels disabled by TIDE_DISABLE_NATIVE=1")
        return None
    if not cpu_supports_avx2():
        log.warning("CPU lacks AVX2: using PyTorch matmuls instead of the %s kernel", what)
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: using PyTorch matmuls instead of the %s kernel", what)
        return None
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        return load(name=name, sources=[str(source)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", *extra],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a broken toolchain must not stop serving
        log.warning("could not build the %s CPU kernel (%s): using PyTorch matmuls", what, exc)
        return None


@functools.lru_cache(maxsize=1)
def load_gemm_bf16w() -> ModuleType | None:
    """The compiled bf16-weight kernel module, or None (with the reason logged once) when it cannot be built here."""
    return _build("tide_gemm_bf16w_v2", _SOURCE, "bf16-weight", [])


@functools.lru_cache(maxsize=1)
def load_gemm_gguf() -> ModuleType | None:
    """The compiled GGUF-block kernel module (Q4_1 / Q8_0 weights, float32 math; AVX-512 where the CPU has it,
    else AVX2), or None (with the reason logged once) when it cannot be built here. Needs F16C (every AVX2 CPU
    has it) for the blocks' fp16 scales."""
    return _build("tide_gemm_gguf_v1", _GGUF_SOURCE, "GGUF-block", ["-mf16c"])

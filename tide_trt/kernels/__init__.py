"""Native CPU kernels, compiled on first use with PyTorch's C++ extension builder (needs a C++ compiler and
ninja; both are checked, and every caller falls back to plain PyTorch ops when the build is not possible).

`gemm_bf16w.cpp`: float32 activations x bfloat16 weights, AVX2/FMA, batch-invariant (see the file header).
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


@functools.lru_cache(maxsize=1)
def load_gemm_bf16w() -> ModuleType | None:
    """The compiled kernel module, or None (with the reason logged once) when it cannot be built here."""
    if os.environ.get("TIDE_DISABLE_NATIVE") == "1":
        log.info("native CPU kernels disabled by TIDE_DISABLE_NATIVE=1")
        return None
    if not cpu_supports_avx2():
        log.warning("CPU lacks AVX2: using PyTorch matmuls instead of the bf16-weight kernel")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: using PyTorch matmuls instead of the bf16-weight kernel")
        return None
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        return load(name="tide_gemm_bf16w_v2", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a broken toolchain must not stop serving
        log.warning("could not build the bf16-weight CPU kernel (%s): using PyTorch matmuls", exc)
        return None

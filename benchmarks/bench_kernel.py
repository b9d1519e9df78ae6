"""Native bf16-weight kernel and GGUF-block kernels (Q4_1, Q8_0) vs MKL float32 vs PyTorch bf16 matmul, per row
count (decode/verify shapes; large row counts: prefill). Times are the median of `reps` calls on random weights.

    tide bench bench_kernel --out benchmarks/results/bench_kernel.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from benchmarks.common import machine, write_json

SHAPES = {"gate_up 3072x576": (3072, 576), "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def _ms(fn, n: int) -> float:
    """Median milliseconds of n calls (a shared machine's stalls hit single calls; the median ignores them)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_kernel")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tide_trt.kernels import load_gemm_bf16w, load_gemm_gguf
    from tide_trt.models.gguf_weights import QuantWeight

    kernel = load_gemm_bf16w()
    gguf = load_gemm_gguf()
    result = {"benchmark": "kernel", "machine": machine(), "native": kernel is not None,
              "gguf_isa": gguf.isa() if gguf is not None else None, "ms": {}}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k).to(torch.bfloat16)
        w32 = w.float()
        q4 = QuantWeight.quantize(w32, "q4_1", "bench").blocks
        q8 = QuantWeight.quantize(w32, "q8_0", "bench").blocks
        reps = 10 if n > 10000 else 30
        for m in args.rows:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            row = {"mkl_fp32": _ms(lambda x=x, w32=w32: x @ w32.t(), reps),
                   "torch_bf16": _ms(lambda xb=xb, w=w: xb @ w.t(), reps)}
            if kernel is not None:
                row["native_bf16w"] = _ms(lambda x=x, w=w: kernel.linear_bf16w(x, w), reps)
            if gguf is not None:
                row["native_q4_1"] = _ms(lambda x=x, q=q4, k=k: gguf.linear_q4_1(x, q, k), reps)
                row["native_q8_0"] = _ms(lambda x=x, q=q8, k=k: gguf.linear_q8_0(x, q, k), reps)
            result["ms"][f"{name} M={m}"] = row
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

"""Speculative-decoding verification as small pure tensor functions (no Triton / TensorRT)."""

from tide_trt.spec.sampling import (
    SamplingParams,
    draw_uniforms,
    inverse_cdf_sample,
    logits_to_probs,
    make_generator,
    params_to_tensors,
    sample_from_probs,
)
from tide_trt.spec.verify import (
    PAD_ID,
    RESIDUAL_EPS,
    VerifyResult,
    greedy_verify,
    mixed_verify,
    rejection_verify,
    scatter_to_target_vocab,
)

__all__ = [
    "PAD_ID",
    "RESIDUAL_EPS",
    "SamplingParams",
    "VerifyResult",
    "draw_uniforms",
    "greedy_verify",
    "inverse_cdf_sample",
    "logits_to_probs",
    "make_generator",
    "mixed_verify",
    "params_to_tensors",
    "rejection_verify",
    "sample_from_probs",
    "scatter_to_target_vocab",
]

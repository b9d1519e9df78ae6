"""Quantized linear weights for the CPU kernel: a GGUF file's own Q4_1 / Q8_0 blocks (`engine.weights`).

A GGUF (llama.cpp's format) stores each linear weight [N, K] as N rows of K/32 blocks; Q4_1 blocks are 20 bytes
(fp16 scale d, fp16 minimum m, 32 4-bit codes: w = d·q + m), Q8_0 blocks 34 bytes (fp16 d, 32 int8 codes: w = d·q).
`tide_trt/kernels/gemm_gguf.cpp` multiplies float32 activations by these blocks directly, so a decode step reads
~5-9 bits per weight instead of bf16's 16.

Which blocks a linear uses (`load_quant_linears`):
- the file holds it as Q4_1 or Q8_0: the file's blocks as stored, whatever quantized mode was asked (they are the
  published numbers; requantizing would move away from them). The default model's file holds its 210 linears in
  Q4_1 and its tied embedding / LM head (`token_embd`) in Q8_0, so its LM head runs in Q8_0 in either mode;
- otherwise (another type in the file, or a checkpoint without a GGUF): quantized from the checkpoint's float
  values into the mode's format with the `gguf` package's reference quantizer (logged: this is lossy).

The checkpoint's float32 values remain the source for everything else (embedding lookup, norms). For the default
model they are the float32 dequantization of the same file, so the blocks are checked against them on load.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from tide_trt.errors import TideError

if TYPE_CHECKING:
    from tide_trt.models.llama import LlamaArch

log = logging.getLogger(__name__)

QuantFormat = Literal["q4_1", "q8_0"]
BLOCK = 32
BLOCK_BYTES: dict[str, int] = {"q4_1": 20, "q8_0": 34}

# Hugging Face linear name (per layer) -> GGUF tensor name
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _ggml_type(fmt: str):
    from gguf import GGMLQuantizationType

    return {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}[fmt]


@dataclass
class QuantWeight:
    """A linear weight [out_features, in_features] held as quantized blocks."""

    fmt: QuantFormat
    blocks: torch.Tensor  # [N, K/32 * block bytes] uint8
    in_features: int  # K
    source: str  # "file:<GGUF type>" (the file's blocks) or "quantized:<from dtype>" (quantized on load)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        return int(self.blocks.numel())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these blocks encode (exactly the values the kernel multiplies)."""
        from gguf import quants

        return torch.from_numpy(quants.dequantize(self.blocks.numpy(), _ggml_type(self.fmt)).copy())

    @staticmethod
    def quantize(weight: torch.Tensor, fmt: QuantFormat, source: str) -> QuantWeight:
        """Quantize a float weight [N, K] (K a multiple of 32) into `fmt` blocks."""
        from gguf import quants

        n, k = weight.shape
        if k % BLOCK:
            raise TideError(f"{fmt} weights need in_features to be a multiple of {BLOCK}, got {k}")
        blocks = quants.quantize(weight.detach().float().contiguous().numpy(), _ggml_type(fmt))  # [N, K/32*bytes]
        return QuantWeight(fmt, torch.from_numpy(np.ascontiguousarray(blocks)), k, source)

    @staticmethod
    def concat(parts: list[QuantWeight]) -> QuantWeight:
        """Stack weights of one format along the output dimension (fused QKV, gate/up)."""
        fmts = {p.fmt for p in parts}
        if len(fmts) != 1 or len({p.in_features for p in parts}) != 1:
            raise ValueError("only weights of one format and width can be fused")
        return QuantWeight(parts[0].fmt, torch.cat([p.blocks for p in parts]).contiguous(), parts[0].in_features,
                           "+".join(sorted({p.source for p in parts})))


def find_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a checkpoint directory was made from: a *.gguf inside it, or the default model's file when the
    directory is its safetensors cache."""
    inside = sorted(model_dir.glob("*.gguf"))
    if inside:
        return inside[0]
    from safetensors import safe_open

    from tide_trt.models.default_model import GGUF_FILENAME, gguf_path

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("source") == GGUF_FILENAME:
                return gguf_path()
    return None


def _unpermute_rows(blocks: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of Q and K within each head (interleaved RoPE pairs); put them back in
    the Hugging Face rotate-half order. blocks [N, bytes] -> [N, bytes]."""
    n = blocks.shape[0]
    return blocks.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(blocks.shape)


def gguf_linear_types(path: Path, arch: LlamaArch) -> dict[str, str]:
    """HF weight name -> the GGUF type the file stores it in, for every linear (LM head included)."""
    return {name: t.tensor_type.name for name, t in _gguf_linears(path, arch).items()}


def _gguf_linears(path: Path, arch: LlamaArch) -> dict:
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    out = {}
    for i in range(arch.num_layers):
        for hf, gg in _LAYER_NAMES.items():
            name = f"blk.{i}.{gg}.weight"
            if name not in tensors:
                raise TideError(f"{path.name} has no tensor {name}")
            out[f"model.layers.{i}.{hf}.weight"] = tensors[name]
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if head is None:
        raise TideError(f"{path.name} has neither output.weight nor token_embd.weight")
    out["lm_head.weight"] = head
    return out


def auto_format(path: Path | None, arch: LlamaArch) -> str:
    """What `engine.weights: auto` means for this checkpoint: the format most of the file's layer linears are
    stored in when the kernel reads it (q4_1 or q8_0), else bf16."""
    if path is None:
        return "bf16"
    counts = Counter(t for name, t in gguf_linear_types(path, arch).items() if name != "lm_head.weight")
    fmt, _ = counts.most_common(1)[0]
    return fmt.lower() if fmt in ("Q4_1", "Q8_0") else "bf16"


def load_quant_linears(state: dict[str, torch.Tensor], arch: LlamaArch, fmt: QuantFormat, gguf: Path | None,
                       head_name: str) -> tuple[dict[str, QuantWeight], dict[str, int]]:
    """Every linear weight of the checkpoint (names as in `state`, the LM head under `head_name`) as a QuantWeight.

    Returns (weights, how many came from each source) — e.g. {"file:Q4_1": 210, "file:Q8_0": 1}."""
    names = [f"model.layers.{i}.{hf}.weight" for i in range(arch.num_layers) for hf in _LAYER_NAMES]
    file_tensors = _gguf_linears(gguf, arch) if gguf is not None else {}
    out: dict[str, QuantWeight] = {}
    for name in [*names, "lm_head.weight"]:
        ref = state[head_name if name == "lm_head.weight" else name]  # [N, K] float
        t = file_tensors.get(name)
        kind = t.tensor_type.name if t is not None else ""
        if t is not None and kind in ("Q4_1", "Q8_0"):
            blocks = np.asarray(t.data)  # [N, K/32*bytes] uint8, memory-mapped
            if ".q_proj." in name:
                blocks = _unpermute_rows(blocks, arch.num_heads)
            elif ".k_proj." in name:
                blocks = _unpermute_rows(blocks, arch.num_kv_heads)
            data = torch.from_numpy(np.array(blocks, dtype=np.uint8, copy=True))  # [N, K/32*bytes], owned
            w = QuantWeight(kind.lower(), data, ref.shape[1], f"file:{kind}")  # type: ignore[arg-type]
            if w.shape != tuple(ref.shape):
                raise TideError(f"{gguf}: {name} is {w.shape} in the file but {tuple(ref.shape)} in the checkpoint")
            _check_rows(w, ref, name, gguf)
        else:
            w = QuantWeight.quantize(ref, fmt, f"quantized:{kind or str(ref.dtype).removeprefix('torch.')}")
        out[name] = w
    counts = Counter(w.source for w in out.values())
    return out, dict(counts)


def _check_rows(w: QuantWeight, ref: torch.Tensor, name: str, gguf: Path | None) -> None:
    """The file's blocks must encode the checkpoint's values (a sample of rows across all heads): guards against a
    GGUF that is not the checkpoint's source and against a wrong row order."""
    from gguf import quants

    rows = torch.arange(0, w.out_features, max(1, w.out_features // 24))
    got = quants.dequantize(w.blocks[rows].numpy(), _ggml_type(w.fmt))  # [R, K]
    if not np.array_equal(got, ref[rows].float().numpy()):
        raise TideError(f"{gguf}: {name} does not hold the checkpoint's values (another file, or a wrong row order)")

"""A stand-in for the TensorRT runtime only (no TensorRT on CPU machines): the `EngineRuntime` seam of
`tide_trt.engine.trtllm_engine`. Everything on our side of the seam is the real code.

`RecordingRuntime` behaves as a TensorRT-LLM engine does at its boundary: it refuses a step with more packed
tokens than its build-time max_num_tokens (TensorRT's optimization profile; `set_input_shape` fails) and
returns one logits row and one capture row per packed token. Its numbers are arbitrary but deterministic and
label each packed row, so tests can see where every row went: logits row j has its maximum at
(input_ids[j] + 1) % V (greedy decoding then counts up), and capture row j holds input_ids[j] + j / 1000.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tide_trt.config import EngineConfig
from tide_trt.engine.trtllm_engine import CAPTURE_OUTPUT, MANIFEST, TrtllmTargetEngine, make_manifest


class ProfileShapeError(RuntimeError):
    """What TensorRT's set_input_shape reports for a shape outside the engine's optimization profile."""


class RecordingRuntime:
    def __init__(self, vocab_size: int, hidden_size: int, built_max_num_tokens: int, pool_mapping_rank: int = 1):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.built_max_num_tokens = built_max_num_tokens
        self.pool_mapping_rank = pool_mapping_rank
        self.outputs = ["logits", CAPTURE_OUTPUT]
        self.calls: list[dict[str, torch.Tensor]] = []

    def input_rank(self, name: str) -> int:
        assert name == "host_kv_cache_pool_mapping"
        return self.pool_mapping_rank

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = int(feeds["input_ids"].shape[0])
        if n > self.built_max_num_tokens:
            raise ProfileShapeError(f"input_ids [{n}] outside the profile (max {self.built_max_num_tokens})")
        self.calls.append({k: v.clone() for k, v in feeds.items()})
        ids = feeds["input_ids"].long()  # [N]
        logits = torch.zeros(n, self.vocab_size)  # [N, V]
        logits[torch.arange(n), (ids + 1) % self.vocab_size] = 1.0
        label = ids.float() + torch.arange(n, dtype=torch.float32) / 1000  # [N]
        hidden = label[:, None, None].expand(n, 3, self.hidden_size).clone()  # [N, 3, H]
        return {"logits": logits, CAPTURE_OUTPUT: hidden}


def write_engine_dir(path: Path, ckpt, cfg: EngineConfig, built_max_num_tokens: int, tokens_per_block: int) -> Path:
    """The engine directory a build leaves (manifest only: the runtime stands in for rank0.engine)."""
    from tide_trt.engine.base import default_capture_layers

    capture = list(cfg.capture_layers or default_capture_layers(ckpt.arch.num_layers))
    manifest = make_manifest(
        ckpt.fingerprint, capture, cfg.dtype, cfg.max_batch_size, cfg.max_seq_len, built_max_num_tokens,
        tokens_per_block, "", "native",
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def make_trtllm_engine(
    ckpt, tmp_path: Path, *, dtype: str = "float32", max_batch_size: int = 4, max_seq_len: int = 64,
    max_num_tokens: int = 512, built_max_num_tokens: int = 512, tokens_per_block: int = 8,
) -> tuple[TrtllmTargetEngine, RecordingRuntime]:
    cfg = EngineConfig(backend="trtllm", device="cpu", dtype=dtype, max_batch_size=max_batch_size,
                       max_seq_len=max_seq_len, max_num_tokens=max_num_tokens)
    engine_dir = write_engine_dir(tmp_path / "engine", ckpt, cfg, built_max_num_tokens, tokens_per_block)
    runtime = RecordingRuntime(ckpt.arch.vocab_size, ckpt.arch.hidden_size, built_max_num_tokens)
    return TrtllmTargetEngine(ckpt, cfg, engine_dir=engine_dir, runtime=runtime), runtime

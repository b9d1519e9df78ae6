"""Build the TensorRT-LLM target engine for `engine.backend: trtllm`: a Llama checkpoint (the one our loader
reads) with the TideHiddenCapture plugin after the capture layers, packed input, paged KV cache, paged context
FMHA (multi-token appends over a cache) and gathered context logits (verification needs every row).

    python builders/build_target_engine.py --help                       # works without TensorRT
    python builders/build_target_engine.py --config tide.yaml --dry-run # print the resolved build plan
    python builders/build_target_engine.py --config tide.yaml           # build (NVIDIA GPU + TensorRT-LLM)

Every default comes from tide_trt.config (EngineConfig / ModelConfig / DraftConfig), or from --config's YAML,
so the engine matches what `tide serve` will ask for. The engine directory defaults to the one
TrtllmTargetEngine looks in (tide_trt.engine.trtllm_engine.engine_dir_for).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tide_trt.config import TideConfig, load_config  # noqa: E402
from tide_trt.engine.base import default_capture_layers  # noqa: E402
from tide_trt.engine.trtllm_engine import (  # noqa: E402
    DEFAULT_TOKENS_PER_BLOCK,
    MANIFEST,
    check_supported_versions,
    engine_dir_for,
    make_manifest,
    require_trtllm,
)
from tide_trt.errors import TideError  # noqa: E402

log = logging.getLogger("build_target_engine")
PLUGIN_DIR = ROOT / "plugins" / "hidden_capture"
DEFAULT_PLUGIN_LIB = PLUGIN_DIR / "build" / "libtide_hidden_capture.so"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Two passes: --config first, then every other default from that config's dataclasses."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None, help="tide YAML config whose sections give the defaults")
    known, _ = pre.parse_known_args(argv)
    cfg: TideConfig = load_config(known.config)
    e, m, d = cfg.engine, cfg.model, cfg.draft
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[pre],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=m.path, help="HF Llama checkpoint dir, or 'default' (SmolLM2-135M)")
    p.add_argument("--cache-dir", default=m.cache_dir, help="model/engine cache root ('' = TIDE_CACHE_DIR)")
    p.add_argument("--output-dir", default="", help="engine dir ('' = where TrtllmTargetEngine looks)")
    p.add_argument(
        "--dtype", default=e.dtype, choices=["float32", "bfloat16", "float16"], help="engine.dtype"
    )
    p.add_argument(
        "--max-batch-size", type=int, default=e.max_batch_size, help="engine.max_batch_size (slots)"
    )
    p.add_argument("--max-seq-len", type=int, default=e.max_seq_len, help="engine.max_seq_len")
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=int(getattr(e, "max_num_tokens", 0)),
        help="most tokens per step (engine.max_num_tokens: the step loop chunks prompts under it; "
        "0 = max(max_seq_len, max_batch_size * (gamma_max + 1)))",
    )
    p.add_argument("--gamma-max", type=int, default=d.gamma_max, help="largest verification block - 1")
    p.add_argument(
        "--capture-layers",
        type=int,
        nargs=3,
        default=e.capture_layers,
        help="3 capture layers (default [2, L//2, L-3])",
    )
    p.add_argument(
        "--tokens-per-block", type=int, default=DEFAULT_TOKENS_PER_BLOCK, help="paged KV block size"
    )
    p.add_argument(
        "--capture-impl",
        choices=["plugin", "native"],
        default="plugin",
        help="plugin = TideHiddenCapture; native = TensorRT concat (fallback, no plugin library)",
    )
    p.add_argument("--plugin-lib", default=str(DEFAULT_PLUGIN_LIB), help="built libtide_hidden_capture.so")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan as JSON; build nothing")
    return p.parse_args(argv)


def resolve_plan(args: argparse.Namespace, num_layers: int | None, fingerprint: str = "") -> dict[str, Any]:
    """Every build option resolved from args (pure; num_layers None -> capture layers left symbolic)."""
    from tide_trt.config import EngineConfig  # noqa: PLC0415

    if args.capture_layers:
        capture: Any = list(args.capture_layers)
    elif num_layers is not None:
        capture = list(default_capture_layers(num_layers))
    else:
        capture = "[2, L//2, L-3]"
    if (
        num_layers is not None
        and isinstance(capture, list)
        and any(not 0 <= c <= num_layers for c in capture)
    ):
        raise TideError(f"capture layers {capture} outside [0, {num_layers}]")
    max_tokens = args.max_num_tokens or max(args.max_seq_len, args.max_batch_size * (args.gamma_max + 1))
    if max_tokens < args.max_batch_size:
        raise TideError(
            f"--max-num-tokens {max_tokens} < --max-batch-size {args.max_batch_size}: a decode step of a full "
            "batch would not fit"
        )
    ecfg = EngineConfig(
        backend="trtllm",
        device="cuda",
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
    )
    out = args.output_dir or (
        str(engine_dir_for(fingerprint, ecfg, args.cache_dir))
        if fingerprint
        else "<cache>/trtllm/<fingerprint>-..."
    )
    return {
        "model": args.model,
        "output_dir": out,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "max_seq_len": args.max_seq_len,
        "max_input_len": args.max_seq_len,
        "max_num_tokens": max_tokens,
        "capture_layers": capture,
        "tokens_per_block": args.tokens_per_block,
        "capture_impl": args.capture_impl,
        "plugin_lib": args.plugin_lib,
        "gather_context_logits": True,
        "remove_input_padding": True,
        "paged_kv_cache": True,
        "use_paged_context_fmha": True,
        "reduce_fusion": False,
        "fingerprint": fingerprint or None,
    }


def build_settings(plan: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PluginConfig fields, BuildConfig fields) of the target engine, as TensorRT-LLM 1.2.1 names them (pure).

    In 1.2 both are pydantic models: the fields are constructor keywords, validated when the object is built (a
    misspelt or out-of-range field fails there, not silently later). The KV cache kind is BuildConfig's
    `kv_cache_type` (the `tensorrt_llm.llmapi.kv_cache_type.KVCacheType` enum; "paged" here), not the plugin
    config's older, overlapping `paged_kv_cache` switch. Everything the backend depends on is fixed here.
    """
    plugin = {
        "gpt_attention_plugin": plan["dtype"],
        "remove_input_padding": True,  # packed [num_tokens, ...] input (trtllm_layout.pack_batch)
        "context_fmha": True,
        "use_paged_context_fmha": True,  # multi-token appends over a cache: verification blocks
        "tokens_per_block": plan["tokens_per_block"],
        "reduce_fusion": False,  # the capture needs the residual stream as a plain tensor (tp = 1)
    }
    build = {
        "max_batch_size": plan["max_batch_size"],
        "max_input_len": plan["max_input_len"],
        "max_seq_len": plan["max_seq_len"],
        "max_num_tokens": plan["max_num_tokens"],
        "max_beam_width": 1,
        "gather_context_logits": True,  # one logits row per token: verification reads all gamma+1 rows
        "strongly_typed": True,
        "kv_cache_type": "paged",
    }
    return plugin, build


def build(plan: dict[str, Any], ckpt: Any) -> Path:
    """The TensorRT-LLM calls (thin; needs an NVIDIA GPU and TensorRT-LLM 1.2.1). Returns the engine directory."""
    from tensorrt_llm import BuildConfig  # noqa: PLC0415
    from tensorrt_llm import build as trtllm_build  # noqa: PLC0415
    from tensorrt_llm.llmapi.kv_cache_type import KVCacheType  # noqa: PLC0415
    from tensorrt_llm.models import LLaMAForCausalLM  # noqa: PLC0415
    from tensorrt_llm.plugin import PluginConfig  # noqa: PLC0415

    plugin_fields, build_fields = build_settings(plan)
    try:
        bc = BuildConfig(
            **{**build_fields, "kv_cache_type": KVCacheType(build_fields["kv_cache_type"])},
            plugin_config=PluginConfig(**plugin_fields),
        )
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise TideError(
            f"TensorRT-LLM rejected the engine's build settings ({exc}); builders/ follow TensorRT-LLM 1.2.1 "
            "(pip install '.[trtllm]', docs/TRTLLM.md)"
        ) from exc
    model = LLaMAForCausalLM.from_hugging_face(str(ckpt.path), dtype=plan["dtype"])
    network_py = importlib.util.spec_from_file_location("tide_capture_network", PLUGIN_DIR / "network.py")
    capture = importlib.util.module_from_spec(network_py)
    sys.modules["tide_capture_network"] = capture  # dataclasses resolve annotations through sys.modules
    network_py.loader.exec_module(capture)
    capture.install_capture(
        model, plan["capture_layers"], impl=plan["capture_impl"], plugin_library=plan["plugin_lib"]
    )
    engine = trtllm_build(model, bc)
    out = Path(plan["output_dir"])
    engine.save(str(out))
    manifest = make_manifest(
        ckpt.fingerprint,
        plan["capture_layers"],
        plan["dtype"],
        plan["max_batch_size"],
        plan["max_seq_len"],
        plan["max_num_tokens"],
        plan["tokens_per_block"],
        str(Path(plan["plugin_lib"]).resolve()) if plan["capture_impl"] == "plugin" else "",
        plan["capture_impl"],
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _config_layers(model: str, cache_dir: str) -> int | None:
    """num_hidden_layers from config.json when it can be read without converting anything."""
    from tide_trt.config import default_cache_dir  # noqa: PLC0415
    from tide_trt.models.default_model import DEFAULT_MODEL_NAME  # noqa: PLC0415

    path = (
        (Path(cache_dir) if cache_dir else default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
        if model in ("", "default")
        else Path(model)
    )
    try:
        return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.dry_run:
            plan = resolve_plan(args, _config_layers(args.model, args.cache_dir))
            plugin_fields, build_fields = build_settings(plan)
            print(json.dumps({**plan, "plugin_config": plugin_fields, "build_config": build_fields}, indent=2))
            return 0
        trt, trtllm = require_trtllm()
        check_supported_versions(str(trtllm.__version__), str(trt.__version__))  # builds with 1.2.1's APIs
        from tide_trt.models.loader import load_checkpoint  # noqa: PLC0415

        ckpt = load_checkpoint(args.model, args.cache_dir)
        plan = resolve_plan(args, ckpt.arch.num_layers, ckpt.fingerprint)
        out = build(plan, ckpt)
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote the TensorRT-LLM engine to {out}; serve it with engine.backend: trtllm, engine.device: cuda"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export the EAGLE-3 draft head to ONNX (one chained draft step, explicit KV cache) and build a REFITTABLE
TensorRT engine from it, plus the weight-name map that `tide_trt.engine.trt_refit` uses to refit it.

    python builders/build_draft_engine.py --draft runs/drafts/v3 --out-dir runs/draft_engine
    python builders/build_draft_engine.py --draft runs/drafts/v3 --out-dir /tmp/x --onnx-only   # no TensorRT

Graph (B = sequences, T = new entries, P = cached entries, C = 3 capture layers, D = head_dim):
  inputs   captured [B,T,C,H]   prev_hidden [B,T,H]
           from_target [B,T,1] (1: feature = fc(captured), 0: feature = prev_hidden)
           token_embed [B,T,H] (target embeddings of token p+1)   positions [B,T] int64
           past_key / past_value [B,Hkv,P,D]   attn_mask [B,1,T,P+T] additive   last_index [B] int64
  outputs  logits [B,Vd] float32   last_hidden [B,H]   present_key / present_value [B,Hkv,P+T,D]
Only the draft weights are refittable (BuilderFlag.REFIT_INDIVIDUAL); the RoPE table is a frozen constant,
the target embeddings stay outside (an input), d2t is applied by the caller.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tide_trt.config import DraftConfig, EngineConfig  # noqa: E402
from tide_trt.draft.eagle3 import Eagle3Head  # noqa: E402
from tide_trt.engine.trt_refit import WeightSpec, dtype_name, save_name_map  # noqa: E402
from tide_trt.errors import TideError  # noqa: E402
from tide_trt.models.llama import apply_rope, rms_norm  # noqa: E402

log = logging.getLogger("build_draft_engine")
INPUTS = [
    "captured",
    "prev_hidden",
    "from_target",
    "token_embed",
    "positions",
    "past_key",
    "past_value",
    "attn_mask",
    "last_index",
]
OUTPUTS = ["logits", "last_hidden", "present_key", "present_value"]
# graph parameter (= ONNX initializer = TensorRT weight name) -> (draft state-dict key, transform)
WEIGHTS = {
    "w_fc": ("fc.weight", "transpose"),
    "norm_embed": ("norm_embed", "identity"),
    "norm_hidden": ("norm_hidden", "identity"),
    "w_qkv": ("qkv.weight", "transpose"),
    "w_o": ("o.weight", "transpose"),
    "post_norm": ("post_norm", "identity"),
    "w_gate_up": ("gate_up.weight", "transpose"),
    "w_down": ("down.weight", "transpose"),
    "final_norm": ("final_norm", "identity"),
    "w_lm_head": ("lm_head.weight", "transpose"),
}


class DraftStepGraph(nn.Module):
    """One EAGLE-3 draft step as a pure function of its inputs (what the ONNX graph / TensorRT engine runs).

    2-D weights are stored [in, out] so every projection is a plain MatMul on an initializer whose name is the
    parameter name: nothing is constant-folded into an unnamed weight, so the engine's weight names are known.
    """

    def __init__(self, head: Eagle3Head, dtype: torch.dtype = torch.float32):
        super().__init__()
        c = head.cfg
        self.cfg = c
        state = head.state_dict()
        for name, (key, transform) in WEIGHTS.items():
            w = state[key].detach().to(dtype)
            self.register_parameter(
                name,
                nn.Parameter((w.t() if transform == "transpose" else w).contiguous(), requires_grad=False),
            )
        self.register_buffer("cos", head.cos.to(dtype), persistent=False)  # [max_pos, D] frozen constant
        self.register_buffer("sin", head.sin.to(dtype), persistent=False)

    def forward(
        self,
        captured: torch.Tensor,
        prev_hidden: torch.Tensor,
        from_target: torch.Tensor,
        token_embed: torch.Tensor,
        positions: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        attn_mask: torch.Tensor,
        last_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        b, t = positions.shape
        eps = c.rms_norm_eps
        fused = captured.reshape(b, t, -1) @ self.w_fc  # [B, T, H]
        feature = from_target * fused + (1.0 - from_target) * prev_hidden  # [B, T, H]
        x2 = torch.cat(
            [rms_norm(token_embed, self.norm_embed, eps), rms_norm(feature, self.norm_hidden, eps)], -1
        )
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = (x2 @ self.w_qkv).split([q_size, kv_size, kv_size], dim=-1)
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin[positions][:, None]
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
        k = apply_rope(
            k.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin
        )  # [B, Hkv, T, D]
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        present_key = torch.cat([past_key, k], dim=2)  # [B, Hkv, P+T, D]
        present_value = torch.cat([past_value, v], dim=2)
        rep, width = c.num_heads // c.num_kv_heads, present_key.shape[2]
        keys = (
            present_key[:, :, None]
            .expand(b, c.num_kv_heads, rep, width, c.head_dim)
            .reshape(b, q_size // c.head_dim, width, c.head_dim)
        )  # [B, Hq, P+T, D] (GQA: kv head i serves q heads i*rep..)
        values = (
            present_value[:, :, None]
            .expand(b, c.num_kv_heads, rep, width, c.head_dim)
            .reshape(b, q_size // c.head_dim, width, c.head_dim)
        )
        scores = (q @ keys.transpose(-1, -2)).float() / math.sqrt(
            c.head_dim
        ) + attn_mask.float()  # [B,Hq,T,P+T]
        attn = torch.softmax(scores, dim=-1).to(q.dtype) @ values  # [B, Hq, T, D]
        x = feature + attn.transpose(1, 2).reshape(b, t, q_size) @ self.w_o  # [B, T, H]
        gate, up = (rms_norm(x, self.post_norm, eps) @ self.w_gate_up).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ self.w_down
        last = x[torch.arange(b, device=x.device), last_index]  # [B, H]
        logits = (rms_norm(last, self.final_norm, eps) @ self.w_lm_head).float()  # [B, Vd]
        return logits, last, present_key, present_value


def weight_specs(head: Eagle3Head, dtype: torch.dtype) -> dict[str, WeightSpec]:
    """The weight-name map of the graph built from `head` (names, sources, engine shapes, dtype)."""
    state = head.state_dict()
    specs = {}
    for name, (key, transform) in WEIGHTS.items():
        shape = tuple(state[key].shape)
        specs[name] = WeightSpec(
            key, transform, shape[::-1] if transform == "transpose" else shape, dtype_name(dtype)
        )
    return specs


def attention_mask(
    past_lens: list[int], width: int, num_new: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive mask [B, 1, T, P+T]: cached key j < past_lens[b] and new key u <= t visible (0), rest -inf."""
    key = torch.arange(width + num_new)  # [P+T]
    query = torch.arange(num_new)  # [T]
    rows = []
    for past in past_lens:
        cached = (key[None, :] < past) & (key[None, :] < width)  # [1, P+T]
        new = (key[None, :] >= width) & (key[None, :] - width <= query[:, None])  # [T, P+T]
        rows.append(cached | new)
    visible = torch.stack(rows)[:, None]  # [B, 1, T, P+T]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def example_inputs(
    graph: DraftStepGraph, batch: int = 2, new: int = 3, past: int = 4, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Shape-correct inputs for tracing/export (values are arbitrary)."""
    c = graph.cfg
    h, cl = c.hidden_size, len(c.capture_layers)
    return (
        torch.randn(batch, new, cl, h, dtype=dtype),
        torch.randn(batch, new, h, dtype=dtype),
        torch.ones(batch, new, 1, dtype=dtype),
        torch.randn(batch, new, h, dtype=dtype),
        torch.arange(past, past + new).repeat(batch, 1),
        torch.randn(batch, c.num_kv_heads, past, c.head_dim, dtype=dtype),
        torch.randn(batch, c.num_kv_heads, past, c.head_dim, dtype=dtype),
        attention_mask([past] * batch, past, new, dtype),
        torch.full((batch,), new - 1, dtype=torch.long),
    )


def dynamic_axes() -> dict[str, dict[int, str]]:
    """Named dynamic axes for the TorchScript exporter (PT = P + T is a separate name there)."""
    per_token = {"captured", "prev_hidden", "from_target", "token_embed", "positions"}
    axes: dict[str, dict[int, str]] = {name: {0: "B", 1: "T"} for name in per_token}
    axes.update({"past_key": {0: "B", 2: "P"}, "past_value": {0: "B", 2: "P"}, "last_index": {0: "B"}})
    axes.update({"attn_mask": {0: "B", 2: "T", 3: "PT"}, "logits": {0: "B"}, "last_hidden": {0: "B"}})
    axes.update({"present_key": {0: "B", 2: "PT"}, "present_value": {0: "B", 2: "PT"}})
    return axes


def dynamic_shapes(max_batch: int = 1024, max_tokens: int = 8192) -> dict[str, dict[int, object]]:
    """torch.export dims (the dynamo exporter): symbolic B, T, P; the mask's P+T is derived (Dim.AUTO)."""
    dim = torch.export.Dim
    b, t, p = dim("B", min=1, max=max_batch), dim("T", min=1, max=max_tokens), dim("P", min=0, max=max_tokens)
    shapes: dict[str, dict[int, object]] = {
        name: {0: b, 1: t} for name in ("captured", "prev_hidden", "from_target", "token_embed", "positions")
    }
    shapes.update({"past_key": {0: b, 2: p}, "past_value": {0: b, 2: p}, "last_index": {0: b}})
    shapes["attn_mask"] = {0: b, 2: t, 3: dim.AUTO}
    # in forward()'s order: torch.onnx renames the axes by zipping this dict's values with the graph inputs
    return {name: shapes[name] for name in INPUTS}


def export_onnx(graph: DraftStepGraph, path: Path, dtype: torch.dtype, opset: int = 18) -> Path:
    """torch.onnx export (needs the `onnx` package; the dynamo exporter also needs `onnxscript`).

    No constant folding / graph optimisation: a folded weight would get a generated name and could no longer
    be refitted by name (the TensorRT build checks every mapped name with mark_weights_refittable).
    """
    try:
        import onnx  # noqa: F401, PLC0415
    except ImportError as exc:
        raise TideError(f"ONNX export needs the onnx package (pip install onnx onnxscript): {exc}") from exc
    args = example_inputs(graph, dtype=dtype)
    common = {"input_names": INPUTS, "output_names": OUTPUTS, "opset_version": opset}
    with torch.no_grad():
        if importlib.util.find_spec("onnxscript") is not None:
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(),
                optimize=False,
                external_data=False,
                **common,
            )
        else:  # TorchScript exporter (deprecated in torch >= 2.9, still shipped)
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=False,
                dynamic_axes=dynamic_axes(),
                do_constant_folding=False,
                **common,
            )
    return path


def build_engine(
    onnx_path: Path,
    out_path: Path,
    specs: dict[str, WeightSpec],
    cfg: argparse.Namespace,
    graph: DraftStepGraph,
) -> None:
    """Parse the ONNX graph and build a strongly typed engine whose only refittable weights are `specs`."""
    import tensorrt as trt  # noqa: PLC0415

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TideError(f"TensorRT could not parse {onnx_path}: {errors}")
    unmarked = [n for n in specs if not network.mark_weights_refittable(n)]
    if unmarked:
        raise TideError(f"weights not found in the parsed network (renamed by the exporter?): {unmarked}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    if cfg.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    c = graph.cfg
    h, cl, kv, d = c.hidden_size, len(c.capture_layers), c.num_kv_heads, c.head_dim
    b_max, t_max, p_max = cfg.max_batch_size, cfg.max_step_tokens, cfg.max_seq_len
    profile = builder.create_optimization_profile()
    per_token = {"captured": (cl, h), "prev_hidden": (h,), "from_target": (1,), "token_embed": (h,)}
    for name, tail in per_token.items():
        profile.set_shape(name, (1, 1, *tail), (b_max, 1, *tail), (b_max, t_max, *tail))
    profile.set_shape("positions", (1, 1), (b_max, 1), (b_max, t_max))
    for name in ("past_key", "past_value"):
        profile.set_shape(name, (1, kv, 0, d), (b_max, kv, p_max // 2, d), (b_max, kv, p_max, d))
    profile.set_shape(
        "attn_mask", (1, 1, 1, 1), (b_max, 1, 1, p_max // 2 + 1), (b_max, 1, t_max, p_max + t_max)
    )
    profile.set_shape("last_index", (1,), (b_max,), (b_max,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TideError("TensorRT failed to build the draft engine (see the log above)")
    out_path.write_bytes(bytes(plan))


def load_head(path: Path) -> Eagle3Head:
    """A draft checkpoint's head without its target (token embeddings are an input of the graph)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from tide_trt.draft.checkpoint import WEIGHTS as WEIGHTS_FILE  # noqa: PLC0415
    from tide_trt.draft.checkpoint import read_draft_config  # noqa: PLC0415

    cfg, _ = read_draft_config(path)
    head = Eagle3Head(cfg, None)
    head.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return head


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    e, d = EngineConfig(), DraftConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--draft", default=d.path, help="draft checkpoint dir ('default' = the shipped draft)")
    p.add_argument("--out-dir", required=True, help="where draft.onnx, draft.engine, weight_map.json go")
    p.add_argument(
        "--dtype",
        default=e.dtype,
        choices=["float32", "bfloat16", "float16"],
        help="engine dtype (refits must supply weights in it)",
    )
    p.add_argument("--max-batch-size", type=int, default=e.max_batch_size, help="engine.max_batch_size")
    p.add_argument("--max-seq-len", type=int, default=e.max_seq_len, help="max cached entries P")
    p.add_argument(
        "--max-step-tokens",
        type=int,
        default=e.max_seq_len,
        help="max new entries T in one step (a prompt catch-up feeds the whole prompt)",
    )
    p.add_argument("--gamma-max", type=int, default=d.gamma_max, help="recorded for the serving side")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export (no TensorRT needed)")
    p.add_argument(
        "--strip-weights",
        action="store_true",
        help="weight-stripped plan (BuilderFlag.STRIP_PLAN): refit every weight before first use",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tide_trt.runtime import resolve_draft_path  # noqa: PLC0415

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        draft = resolve_draft_path(args.draft)
        if draft is None:
            raise TideError("--draft is 'none': nothing to export")
        head = load_head(draft)
        graph = DraftStepGraph(head, dtype).eval()
        specs = weight_specs(head, dtype)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(graph, out / "draft.onnx", dtype, args.opset)
        save_name_map(
            out / "weight_map.json",
            specs,
            {
                "draft_config": head.cfg.to_dict(),
                "inputs": INPUTS,
                "outputs": OUTPUTS,
                "max_batch_size": args.max_batch_size,
                "max_seq_len": args.max_seq_len,
                "max_step_tokens": args.max_step_tokens,
                "gamma_max": args.gamma_max,
                "strip_weights": args.strip_weights,
            },
        )
        print(f"wrote {onnx_path} and {out / 'weight_map.json'} ({len(specs)} refittable weights)")
        if args.onnx_only:
            return 0
        try:
            import tensorrt  # noqa: F401, PLC0415
        except ImportError:
            print(
                "error: building the TensorRT engine needs TensorRT on an NVIDIA GPU (pip install tensorrt "
                "in the serving container); use --onnx-only to stop after the export",
                file=sys.stderr,
            )
            return 2
        build_engine(onnx_path, out / "draft.engine", specs, args, graph)
        # Prove the refit path once with the weights just exported (a stripped plan is unusable before it).
        from tide_trt.engine.trt_refit import refit_draft_engine  # noqa: PLC0415

        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in head.state_dict().items()}
        refit_draft_engine(out / "draft.engine", state, specs)
        print(f"wrote {out / 'draft.engine'} (refittable; refit with tide_trt.engine.trt_refit)")
        return 0
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

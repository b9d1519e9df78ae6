"""Validate the TensorRT-LLM path end to end on a machine with an NVIDIA GPU and the TensorRT-LLM container.

    python builders/validate_trtllm.py --work-dir runs/validate_trtllm            # everything, default model
    python builders/validate_trtllm.py --work-dir /tmp/v --dtype float32 --skip triton

One command, in order (a failed step marks the steps that need it "skip"; the report is written either way):
  environment     tensorrt / tensorrt_llm importable, a CUDA device, and exactly the versions this layer was
                  written for (TensorRT-LLM 1.2.1, TensorRT 10.14): any other release is refused, exit code 2
  plugin          the TideHiddenCapture library (built with CMake if --plugin-lib is missing)
  target_build    builders/build_target_engine.py with the capture plugin
  target_vs_torch TrtllmTargetEngine vs TorchTargetEngine on the same prompts: logits and captured states over a
                  prefill, a verification block, a decode step and a rollback (tolerances per dtype below; the
                  states per channel: Llama's few outlier channels would hide drift in the ordinary ones)
  draft_build     builders/build_draft_engine.py: the refittable draft engine + weight map
  draft_refit     the draft engine vs DraftStepGraph in torch, refit with new weights (refit_draft_engine), and
                  the engine's outputs must change as the torch head's did
  spec_vs_plain   greedy speculative decoding (PyTorch draft next to the TensorRT target) vs plain decoding in the
                  same engine, token for token (a divergence is allowed only at a plain-decoding near-tie); drafts
                  must have been accepted (a draft that is never accepted verifies nothing: the check fails)
  triton          `tide serve` with engine.backend trtllm; served greedy text vs the in-process decode
Prints a table and writes <work-dir>/validate_trtllm.json. Exit code 0 = every check passed, 1 = a check failed,
2 = the machine cannot run the checks (no GPU / TensorRT-LLM, or a TensorRT-LLM / TensorRT release other than the
ones above).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tide_trt.engine.trtllm_engine import (  # noqa: E402
    SUPPORTED_TENSORRT,
    SUPPORTED_TRTLLM,
    check_supported_versions,
)
from tide_trt.errors import TideError  # noqa: E402

log = logging.getLogger("validate_trtllm")

REPORT = "validate_trtllm.json"
REPORT_FORMAT = "tide-validate-trtllm-v1"
# What this layer was written and reviewed against; docs/TRTLLM.md and pyproject's [trtllm] extra say the same. Any
# other version is refused by the environment check (tide_trt.engine.trtllm_engine.check_supported_versions).
PINNED = {"tensorrt_llm": SUPPORTED_TRTLLM, "tensorrt": SUPPORTED_TENSORRT}
CHECKS = (
    "environment", "plugin", "target_build", "target_vs_torch", "draft_build", "draft_refit", "spec_vs_plain",
    "triton",
)
NEEDS = {  # a check runs only if these passed
    "plugin": ("environment",),
    "target_build": ("plugin",),
    "target_vs_torch": ("target_build",),
    "draft_build": ("environment",),
    "draft_refit": ("draft_build",),
    "spec_vs_plain": ("target_build",),
    "triton": ("target_build",),
}
# (max |Δlogits| / max |logits|, per-channel state error (`per_channel_rel_error`), top-1 agreement) per dtype:
# float32 must agree to accumulation order; 16-bit types to their rounding (a top-1 flip needs a near-tie)
TOLERANCES = {"float32": (1e-3, 1e-3, 1.0), "bfloat16": (4e-2, 4e-2, 0.98), "float16": (1e-2, 1e-2, 0.99)}
DRAFT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}  # max |Δlogits| / max |logits|
NEAR_TIE = 0.05  # plain decoding's top-1 minus top-2 logit below this: rounding may flip the argmax
CHANNEL_FLOOR = 1e-3  # a channel's scale is at least this share of the largest |x| (near-silent channels)
PROMPTS = (
    "Explain how a KV cache speeds up autoregressive decoding.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France? Answer in one sentence.",
    "List three differences between TCP and UDP.",
)


@dataclass
class Check:
    name: str
    status: str = "skip"  # pass | fail | error | skip
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


class CheckFailed(Exception):
    """A check ran and its result is outside the tolerance (status fail, not error)."""


# --- report (pure; tested on CPU) ------------------------------------------------------------------------
def format_table(checks: list[Check]) -> str:
    rows = [("check", "status", "seconds", "metrics / detail")]
    for c in checks:
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in c.metrics.items())
        text = "; ".join(x for x in (metrics, c.detail) if x)
        rows.append((c.name, c.status.upper(), f"{c.seconds:.1f}", text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(widths[i]) if i < 3 else r[i] for i in range(4)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 16)
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def overall(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    if "fail" in statuses or "error" in statuses:
        return "fail"
    return "pass" if statuses == {"pass"} else "incomplete"


def write_report(path: Path, checks: list[Check], args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    doc = {
        "format": REPORT_FORMAT,
        "created": time.time(),
        "result": overall(checks),
        "pinned": PINNED,
        "environment": env,
        "arguments": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        "tolerances": {"target": TOLERANCES, "draft": DRAFT_TOLERANCE, "near_tie": NEAR_TIE},
        "checks": [dataclasses.asdict(c) for c in checks],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    return doc


def environment() -> dict[str, Any]:
    """Versions and devices, without importing anything that may be missing."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("torch", "tensorrt", "tensorrt_llm", "onnx", "tritonclient"):
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
            env[mod] = f"missing ({type(exc).__name__}: {exc})"
    try:
        import torch  # noqa: PLC0415

        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001
        env["gpu"] = f"unknown ({exc})"
    env["tritonserver"] = shutil.which("tritonserver")
    return env


@dataclass(frozen=True)
class InstalledStack:
    """What the environment check reads from the machine: the installed TensorRT-LLM and TensorRT versions."""

    tensorrt_llm: str
    tensorrt: str


def probe_installed() -> InstalledStack:
    """The real probe: imports tensorrt + tensorrt_llm and checks for a CUDA device (TideError otherwise)."""
    from tide_trt.engine.trtllm_engine import require_trtllm  # noqa: PLC0415

    trt, trtllm = require_trtllm()
    return InstalledStack(tensorrt_llm=str(trtllm.__version__), tensorrt=str(trt.__version__))


# --- measures (pure; tested on CPU) -----------------------------------------------------------------------
def per_channel_rel_error(got: Any, want: Any, floor: float = CHANNEL_FLOOR) -> float:
    """got, want [n, *channels] (positions first; captured states [n, C, H]): the largest over channels of
    max |Δ| / max |want| of that channel, the channel's scale floored at `floor` × max |want| so that a channel
    silent on these positions does not divide by ~0. Unlike max |Δ| / max |want| over the whole tensor, drift in
    an ordinary channel is not hidden behind a few outlier channels that are 100× larger."""
    diff = (got.float() - want.float()).abs().flatten(1)  # [n, channels]
    ref = want.float().abs().flatten(1)
    if ref.numel() == 0:
        return 0.0
    scale = ref.amax(0).clamp(min=floor * float(ref.max()) + 1e-30)  # [channels]
    return float((diff.amax(0) / scale).max())


def global_rel_error(got: Any, want: Any) -> float:
    """max |Δ| / max |want| over the whole tensor (the logits' measure)."""
    scale = float(want.float().abs().max())
    return float((got.float() - want.float()).abs().max()) / scale if scale else 0.0


@dataclass
class DecodePair:
    """One prompt decoded plainly and speculatively (greedy) in the same engine."""

    plain: list[int]
    spec: list[int]
    margins: list[float]  # plain decoding's top-1 minus top-2 logit per output token
    drafted: int  # draft tokens the speculative decode proposed
    accepted: int  # ... and the target accepted


def judge_spec_vs_plain(pairs: list[DecodePair], gamma: int) -> dict[str, Any]:
    """Identical outputs, or a first difference at a plain-decoding near-tie; and drafts accepted, or the
    comparison proved nothing (a draft never accepted leaves the target decoding alone). Raises CheckFailed."""
    identical = near_tie = 0
    for i, pair in enumerate(pairs):
        if pair.spec == pair.plain:
            identical += 1
            continue
        first = next((j for j, (a, b) in enumerate(zip(pair.spec, pair.plain, strict=False)) if a != b),
                     min(len(pair.spec), len(pair.plain)))
        if first < len(pair.margins) and pair.margins[first] < NEAR_TIE:
            near_tie += 1
            continue
        raise CheckFailed(f"prompt {i}: speculative output differs from plain decoding at token {first} "
                          "(not a near-tie)")
    drafted, accepted = sum(p.drafted for p in pairs), sum(p.accepted for p in pairs)
    metrics = {"prompts": len(pairs), "identical": identical, "near_tie": near_tie, "gamma": gamma,
               "drafted": drafted, "accepted": accepted}
    if accepted == 0:
        raise CheckFailed(f"no draft token was accepted ({drafted} drafted): the outputs agree because the target "
                          f"decoded alone, so speculative verification was not checked: {metrics}")
    return metrics


# --- checks (need a GPU; not run in CI) -------------------------------------------------------------------
class Validation:
    """The checks. `probe` is the seam to the installed stack: `probe_installed` on a GPU machine; anything that
    returns an `InstalledStack` elsewhere (the CPU tests hand it version strings)."""

    def __init__(self, args: argparse.Namespace, probe: Callable[[], InstalledStack] = probe_installed):
        self.args = args
        self.probe = probe
        self.work = Path(args.work_dir)
        self.engine_dir = self.work / "target_engine"
        self.draft_dir = self.work / "draft_engine"
        default_lib = self.work / "plugin" / "libtide_hidden_capture.so"
        self.plugin_lib = Path(args.plugin_lib) if args.plugin_lib else default_lib
        self.state: dict[str, Any] = {}

    # each returns metrics; raises CheckFailed (fail) or anything else (error)
    def environment(self) -> dict[str, Any]:
        stack = self.probe()  # TideError with the reason on a machine without TensorRT-LLM or a GPU
        # a release this layer was not written for is refused here: every later check would exercise other APIs
        check_supported_versions(stack.tensorrt_llm, stack.tensorrt)
        return {"tensorrt_llm": stack.tensorrt_llm, "tensorrt": stack.tensorrt}

    def plugin(self) -> dict[str, Any]:
        if not self.plugin_lib.is_file():
            build = self.plugin_lib.parent
            root = os.environ.get("TENSORRT_ROOT", self.args.tensorrt_root)
            src = ROOT / "plugins" / "hidden_capture"
            subprocess.run(["cmake", "-S", str(src), "-B", str(build), f"-DTENSORRT_ROOT={root}"], check=True)
            subprocess.run(["cmake", "--build", str(build), "-j"], check=True)
        if not self.plugin_lib.is_file():
            raise CheckFailed(f"{self.plugin_lib} was not produced by the CMake build")
        return {"library": str(self.plugin_lib)}

    def target_build(self) -> dict[str, Any]:
        bte = _load_builder("build_target_engine")
        a = self.args
        argv = ["--model", a.model, "--output-dir", str(self.engine_dir), "--dtype", a.dtype, "--max-batch-size",
                str(a.max_batch_size), "--max-seq-len", str(a.max_seq_len), "--max-num-tokens", str(a.max_num_tokens),
                "--plugin-lib", str(self.plugin_lib)]
        if bte.main(argv) != 0:
            raise CheckFailed("build_target_engine.py failed (see its error above)")
        return {"engine_dir": str(self.engine_dir)}

    def _engines(self) -> tuple[Any, Any, Any]:
        """(checkpoint, tokenizer, TrtllmTargetEngine), loaded once."""
        if "trt" not in self.state:
            from tide_trt.engine.trtllm_engine import TrtllmTargetEngine  # noqa: PLC0415
            from tide_trt.models.loader import load_checkpoint, load_tokenizer  # noqa: PLC0415

            ckpt = load_checkpoint(self.args.model, self.args.cache_dir)
            tok = load_tokenizer(ckpt.path)
            self.state.update(ckpt=ckpt, tok=tok, trt=TrtllmTargetEngine(ckpt, self.engine_cfg(), tok,
                                                                          engine_dir=self.engine_dir))
        return self.state["ckpt"], self.state["tok"], self.state["trt"]

    def engine_cfg(self, **over: Any) -> Any:
        from tide_trt.config import EngineConfig  # noqa: PLC0415

        a = self.args
        base = {"backend": "trtllm", "device": "cuda", "dtype": a.dtype, "max_batch_size": a.max_batch_size,
                "max_seq_len": a.max_seq_len, "max_num_tokens": a.max_num_tokens, **over}
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        return EngineConfig(**{k: v for k, v in base.items() if k in known})

    def prompt_ids(self) -> list[list[int]]:
        from tide_trt.runtime import encode_prompt  # noqa: PLC0415

        _, tok, _ = self._engines()
        return [encode_prompt(tok, p) for p in PROMPTS]

    def target_vs_torch(self) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        from tide_trt.engine.torch_engine import TorchTargetEngine  # noqa: PLC0415

        ckpt, tok, trt_engine = self._engines()
        ref = TorchTargetEngine(ckpt, self.engine_cfg(backend="torch", cpu_kernels="off"), tok)
        prompts = self.prompt_ids()
        slots = [(trt_engine.allocate_slot(), ref.allocate_slot()) for _ in prompts]
        stats: dict[str, Any] = {"logits": 0.0, "hidden": 0.0, "hidden_global": 0.0, "agree": [], "calls": 0}

        def both(tokens: list[list[int]]) -> torch.Tensor:
            a = trt_engine.forward([s for s, _ in slots], tokens, logits="all")
            b = ref.forward([s for _, s in slots], tokens, logits="all")
            for row, t in enumerate(tokens):
                n = len(t)
                la, lb = a.logits[row, :n].float(), b.logits[row, :n].float()  # [n, V]
                ha, hb = a.hidden[row, :n].float(), b.hidden[row, :n].float()  # [n, 3, H]
                stats["logits"] = max(stats["logits"], global_rel_error(la, lb))
                stats["hidden"] = max(stats["hidden"], per_channel_rel_error(ha, hb))
                stats["hidden_global"] = max(stats["hidden_global"], global_rel_error(ha, hb))
                stats["agree"].extend((la.argmax(-1) == lb.argmax(-1)).tolist())
            stats["calls"] += 1
            return b.logits  # [B, T, V]

        lb = both(prompts)  # prefill (context requests)
        nxt = [int(lb[r, len(p) - 1].argmax()) for r, p in enumerate(prompts)]
        block = both([[t, 3, 4, 5] for t in nxt])  # verification blocks: context chunks over the cache
        for (st, sr), _ in zip(slots, prompts, strict=True):  # keep 2 of 4: rollback is a length change
            trt_engine.truncate(st, trt_engine.seq_len(st) - 2)
            ref.truncate(sr, ref.seq_len(sr) - 2)
        both([[int(block[r, 1].argmax())] for r in range(len(prompts))])  # generation requests
        for st, sr in slots:
            trt_engine.free_slot(st)
            ref.free_slot(sr)
        agree = sum(stats["agree"]) / len(stats["agree"])
        tol_l, tol_h, tol_a = TOLERANCES[self.args.dtype]
        metrics = {"logits_rel": stats["logits"], "hidden_rel_per_channel": stats["hidden"],
                   "hidden_rel_global": stats["hidden_global"], "top1_agree": agree, "positions": len(stats["agree"])}
        if stats["logits"] > tol_l or stats["hidden"] > tol_h or agree < tol_a:
            raise CheckFailed(f"outside tolerance (logits {tol_l}, hidden per channel {tol_h}, top-1 {tol_a}): "
                              f"{metrics}")
        return metrics

    def draft_build(self) -> dict[str, Any]:
        bde = _load_builder("build_draft_engine")
        a = self.args
        argv = ["--draft", a.draft, "--out-dir", str(self.draft_dir), "--dtype", a.dtype, "--max-batch-size",
                str(a.max_batch_size), "--max-seq-len", str(a.max_seq_len), "--max-step-tokens", str(a.max_num_tokens)]
        if bde.main(argv) != 0:
            raise CheckFailed("build_draft_engine.py failed (see its error above)")
        return {"engine": str(self.draft_dir / "draft.engine")}

    def draft_refit(self) -> dict[str, Any]:
        import tensorrt as trt  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from tide_trt.engine.trt_refit import refit_draft_engine  # noqa: PLC0415
        from tide_trt.engine.trtllm_engine import _TrtSession  # noqa: PLC0415
        from tide_trt.runtime import resolve_draft_path  # noqa: PLC0415

        bde = _load_builder("build_draft_engine")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.args.dtype]
        old = bde.load_head(resolve_draft_path(self.args.draft))
        new = new_draft_head(bde, old, self.args.new_draft, seed=self.args.seed)
        feeds_cpu = bde.example_inputs(bde.DraftStepGraph(old), batch=2, new=3, past=4, dtype=dtype)
        feeds = {n: t.cuda() for n, t in zip(bde.INPUTS, feeds_cpu, strict=True)}

        def torch_out(head: Any) -> torch.Tensor:
            graph = bde.DraftStepGraph(head, dtype).eval().cuda()
            with torch.no_grad():
                return graph(*feeds.values())[0].float()  # logits [B, Vd]

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((self.draft_dir / "draft.engine").read_bytes())

        def engine_out() -> torch.Tensor:
            return _TrtSession(trt, engine, "cuda").run(dict(feeds))["logits"].float()  # [B, Vd]

        want_old, want_new = torch_out(old), torch_out(new)
        got_old = engine_out()
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in new.state_dict().items()}
        refit_draft_engine(engine, state, self.draft_dir / "weight_map.json")
        got_new = engine_out()
        scale = want_new.abs().max().item()
        m = {
            "err_before": (got_old - want_old).abs().max().item() / scale,
            "err_after": (got_new - want_new).abs().max().item() / scale,
            "engine_change": (got_new - got_old).abs().max().item() / scale,
            "torch_change": (want_new - want_old).abs().max().item() / scale,
            "top1_after": (got_new.argmax(-1) == want_new.argmax(-1)).float().mean().item(),
        }
        tol = DRAFT_TOLERANCE[self.args.dtype]
        if m["err_before"] > tol or m["err_after"] > tol or m["engine_change"] < 0.5 * m["torch_change"]:
            raise CheckFailed(f"refit did not follow the torch head (tolerance {tol}): {m}")
        return m

    def _decode(self, gamma: int, prompt: list[int]) -> tuple[list[int], list[float], int, int]:
        """Greedy decode one prompt at batch 1 through the generator (gamma 0: plain): (output ids, margins,
        draft tokens proposed, accepted). Plain also returns the top-1 minus top-2 logit margin of every output
        token, read from a second plain run's logits."""
        from tide_trt.engine.generator import SpeculativeGenerator  # noqa: PLC0415
        from tide_trt.runtime import build_drafter, make_request, run_to_completion  # noqa: PLC0415
        from tide_trt.spec.sampling import SamplingParams  # noqa: PLC0415

        ckpt, _, eng = self._engines()
        drafter = build_drafter(eng, self.args.draft) if gamma else None
        req = make_request("v", prompt, self.args.max_tokens, SamplingParams(), ckpt.arch.eos_token_ids)
        seq = run_to_completion(SpeculativeGenerator(eng, drafter), [req], gamma).sequences[0]
        margins: list[float] = []
        if gamma == 0:
            slot = eng.allocate_slot()
            out = eng.forward([slot], [list(prompt) + seq.output_ids[:-1]], logits="all")
            top2 = out.logits[0, len(prompt) - 1 :].topk(2, dim=-1).values  # [n_out, 2]
            margins = (top2[:, 0] - top2[:, 1]).tolist()
            eng.free_slot(slot)
        return seq.output_ids, margins, seq.draft_tokens, seq.accepted_tokens

    def spec_vs_plain(self) -> dict[str, Any]:
        _, tok, _ = self._engines()
        pairs = []
        for prompt in self.prompt_ids():
            plain, margins, _, _ = self._decode(0, prompt)
            spec, _, drafted, accepted = self._decode(self.args.gamma, prompt)
            pairs.append(DecodePair(plain, spec, margins, drafted, accepted))
        self.state["texts"] = [{"plain": tok.decode(p.plain, skip_special_tokens=True),
                                "spec": tok.decode(p.spec, skip_special_tokens=True)} for p in pairs]
        return judge_spec_vs_plain(pairs, self.args.gamma)

    def triton(self) -> dict[str, Any]:
        if "texts" not in self.state:
            self.spec_vs_plain()
        cfg_path = self.work / "serve_trtllm.yaml"
        cfg_path.write_text(json.dumps(serve_config(self.args), indent=2))  # JSON is YAML
        env = {**os.environ, "TIDE_TRTLLM_ENGINE_DIR": str(self.engine_dir),
               "TIDE_CAPTURE_PLUGIN": str(self.plugin_lib)}
        port = self.args.http_port
        cmd = [sys.executable, "-m", "tide_trt.cli", "serve", "--config", str(cfg_path), "--no-trainer",
               "--http-port", str(port), "--grpc-port", str(port + 1), "--metrics-port", str(port + 2),
               "--server-log", str(self.work / "tritonserver.log")]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", self.args.ready_timeout)
            served = [generate(f"http://127.0.0.1:{port}", p, self.args.max_tokens) for p in PROMPTS]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        same_plain = sum(s == t["plain"] for s, t in zip(served, self.state["texts"], strict=True))
        same_spec = sum(s == t["spec"] for s, t in zip(served, self.state["texts"], strict=True))
        if same_spec != len(served):
            raise CheckFailed(f"served text differs from the in-process speculative decode for "
                              f"{len(served) - same_spec} of {len(served)} prompts")
        return {"prompts": len(served), "equal_to_plain": same_plain, "equal_to_spec": same_spec}


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `tide serve` config of the Triton check: trtllm target, PyTorch draft on the same GPU, static γ."""
    return {
        "model": {"path": args.model, "cache_dir": args.cache_dir},
        "engine": {"backend": "trtllm", "device": "cuda", "dtype": args.dtype, "max_batch_size": args.max_batch_size,
                   "max_seq_len": args.max_seq_len, "max_num_tokens": args.max_num_tokens},
        "draft": {"path": args.draft, "gamma": args.gamma},
        "controller": {"mode": "static"},
        "signals": {"enabled": False},
        "trainer": {"enabled": False},
        "serving": {"instance_kind": "gpu"},
    }


def new_draft_head(bde: Any, old: Any, new_draft: str, seed: int) -> Any:
    """The refit's new weights: another checkpoint, or the old head with seeded noise (5 % of each tensor's std)."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from tide_trt.runtime import resolve_draft_path  # noqa: PLC0415

    if new_draft:
        return bde.load_head(resolve_draft_path(new_draft))
    new = copy.deepcopy(old)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * p.float().std() * torch.randn(p.shape, generator=gen).to(p.dtype))
    return new


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/tide/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise CheckFailed(f"tritonserver at {url} not ready within {timeout:.0f} s")


def generate(url: str, prompt: str, max_tokens: int) -> str:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{url}/v2/models/tide/generate", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["text_output"]


def _load_builder(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "builders" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_checks(args: argparse.Namespace, validation: Any | None = None) -> list[Check]:
    v = validation or Validation(args)
    checks: dict[str, Check] = {}
    for name in CHECKS:
        c = checks[name] = Check(name)
        missing = [n for n in NEEDS.get(name, ()) if checks[n].status != "pass"]
        if name in args.skip:
            c.detail = "skipped (--skip)"
            continue
        if missing:
            c.detail = f"needs {', '.join(missing)}"
            continue
        t0 = time.perf_counter()
        fn: Callable[[], dict[str, Any]] = getattr(v, name)
        try:
            c.metrics = fn()
            c.status = "pass"
        except CheckFailed as exc:
            c.status, c.detail = "fail", str(exc)
        except TideError as exc:  # a clear, expected refusal (no GPU, unsupported version): no traceback
            c.status, c.detail = "error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the run
            log.exception("check %s raised", name)
            c.status, c.detail = "error", f"{type(exc).__name__}: {exc}"
        c.seconds = time.perf_counter() - t0
        log.info("%s: %s %s", name, c.status, c.detail)
    return list(checks.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tide_trt.config import DraftConfig, EngineConfig, ModelConfig  # noqa: PLC0415

    e, d, m = EngineConfig(), DraftConfig(), ModelConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work-dir", default="runs/validate_trtllm", help="engines, logs and the JSON report go here")
    p.add_argument("--report", default="", help=f"report path ('' = <work-dir>/{REPORT})")
    p.add_argument("--model", default=m.path, help="target checkpoint ('default' = SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=m.cache_dir, help="model cache root ('' = TIDE_CACHE_DIR)")
    p.add_argument("--draft", default=d.path, help="draft checkpoint served and built ('default' = shipped)")
    p.add_argument("--new-draft", default="", help="refit weights ('' = the draft with seeded noise)")
    p.add_argument("--dtype", default=e.dtype, choices=sorted(TOLERANCES), help="engine dtype")
    p.add_argument("--max-batch-size", type=int, default=4, help="engine slots")
    p.add_argument("--max-seq-len", type=int, default=512, help="engine context")
    p.add_argument("--max-num-tokens", type=int, default=e.max_num_tokens, help="step token budget")
    p.add_argument("--gamma", type=int, default=d.gamma, help="draft length of the speculative checks")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    p.add_argument("--plugin-lib", default="", help="built libtide_hidden_capture.so ('' = build into work-dir)")
    p.add_argument("--tensorrt-root", default="/usr/local/tensorrt", help="TensorRT headers/libs for the plugin")
    p.add_argument("--http-port", type=int, default=18000, help="Triton HTTP port (+1 gRPC, +2 metrics)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for Triton")
    p.add_argument("--seed", type=int, default=0, help="seed of the refit's weight noise")
    p.add_argument("--skip", nargs="*", default=[], choices=CHECKS, help="checks to skip")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, probe: Callable[[], InstalledStack] = probe_installed) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    checks = run_checks(args, Validation(args, probe))
    report = Path(args.report) if args.report else Path(args.work_dir) / REPORT
    doc = write_report(report, checks, args, environment())
    sys.stdout.write(format_table(checks) + f"\n\nresult: {doc['result']}  report: {report}\n")
    env_check = checks[0]
    if env_check.status != "pass":
        sys.stderr.write(f"error: this machine cannot run the TensorRT-LLM checks: {env_check.detail}\n")
        return 2
    return 0 if doc["result"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

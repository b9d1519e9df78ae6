"""builders/validate_trtllm.py on CPU: its command line, its report, and its clear refusal without TensorRT-LLM.
The checks themselves need an NVIDIA GPU with TensorRT-LLM (docs/TRTLLM.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vt():
    spec = importlib.util.spec_from_file_location("validate_trtllm", ROOT / "builders/validate_trtllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["validate_trtllm"] = module
    spec.loader.exec_module(module)
    return module


def test_help_lists_every_option():
    done = subprocess.run(
        [sys.executable, str(ROOT / "builders/validate_trtllm.py"), "--help"], capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--work-dir", "--dtype", "--max-num-tokens", "--new-draft", "--skip", "--plugin-lib"):
        assert option in done.stdout, option
    assert "(default: 512)" in done.stdout  # --max-num-tokens from EngineConfig


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed here")
def test_without_tensorrt_llm_it_fails_clearly_and_still_writes_the_report(vt, tmp_path, capsys):
    assert vt.main(["--work-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "cannot run the TensorRT-LLM checks" in err and "needs TensorRT-LLM on an NVIDIA GPU" in err
    doc = json.loads((tmp_path / vt.REPORT).read_text())
    assert doc["format"] == vt.REPORT_FORMAT and doc["result"] == "fail" and doc["pinned"] == vt.PINNED
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == list(vt.CHECKS)
    assert checks["environment"]["status"] == "error"
    assert all(checks[n]["status"] == "skip" and checks[n]["detail"].startswith("needs") for n in vt.CHECKS[1:])
    assert any(line.startswith("environment") and "ERROR" in line for line in out.splitlines())


class Outcomes:
    """Stands in for the GPU: each check returns metrics, fails its tolerance, or raises."""

    def __init__(self, vt, failing: str, raising: str):
        self.vt, self.failing, self.raising = vt, failing, raising

    def __getattr__(self, name):
        def check():
            if name == self.failing:
                raise self.vt.CheckFailed(f"{name} outside tolerance")
            if name == self.raising:
                raise RuntimeError("CUDA error")
            return {"value": 0.5, "count": 3}

        return check


def test_report_of_mixed_results_skips_dependents_and_writes_table_and_json(vt, tmp_path):
    args = vt.parse_args(["--work-dir", str(tmp_path), "--skip", "triton"])
    checks = vt.run_checks(args, Outcomes(vt, failing="target_build", raising="draft_refit"))
    status = {c.name: c.status for c in checks}
    assert status == {
        "environment": "pass", "plugin": "pass", "target_build": "fail", "target_vs_torch": "skip",
        "draft_build": "pass", "draft_refit": "error", "spec_vs_plain": "skip", "triton": "skip",
    }
    details = {c.name: c.detail for c in checks}
    assert details["target_vs_torch"] == "needs target_build" and details["triton"] == "skipped (--skip)"
    assert details["draft_refit"] == "RuntimeError: CUDA error"
    table = vt.format_table(checks)
    lines = table.splitlines()
    assert lines[0].split(" | ")[:3] == ["check          ", "status", "seconds"]
    assert any(line.startswith("draft_build") and "PASS" in line and "value=0.5, count=3" in line for line in lines)
    doc = vt.write_report(tmp_path / "r.json", checks, args, {"gpu": None})
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["result"] == "fail" and doc["arguments"]["skip"] == ["triton"]
    all_pass = vt.run_checks(vt.parse_args(["--work-dir", str(tmp_path)]), Outcomes(vt, "", ""))
    assert vt.overall(all_pass) == "pass"
    assert vt.overall(vt.run_checks(args, Outcomes(vt, "", ""))) == "incomplete"  # triton skipped


def test_serve_config_is_a_valid_trtllm_config(vt):
    from tide_trt.config import config_from_dict

    cfg = config_from_dict(vt.serve_config(vt.parse_args(["--dtype", "float32"])))
    assert (cfg.engine.backend, cfg.engine.device, cfg.engine.dtype) == ("trtllm", "cuda", "float32")
    assert cfg.controller.mode == "static" and not cfg.signals.enabled and not cfg.trainer.enabled


# --- the version gate: only the release this layer was written for (TensorRT-LLM 1.2.1, TensorRT 10.14) ----------
def stack(vt, tensorrt_llm: str, tensorrt: str):
    """The probe seam: what the environment check would read from an installed TensorRT-LLM / TensorRT."""
    return lambda: vt.InstalledStack(tensorrt_llm=tensorrt_llm, tensorrt=tensorrt)


def test_an_unsupported_tensorrt_llm_is_refused_clearly_before_any_other_check(vt, tmp_path, capsys):
    assert vt.main(["--work-dir", str(tmp_path)], probe=stack(vt, "1.3.0rc21", "10.14.1.48")) == 2
    out, err = capsys.readouterr()
    assert "cannot run the TensorRT-LLM checks" in err
    assert "written for TensorRT-LLM 1.2.1 with TensorRT 10.14" in err and "found TensorRT-LLM 1.3.0rc21" in err
    assert "removed after 1.3.0rc20" in err and "pip install '.[trtllm]'" in err
    doc = json.loads((tmp_path / vt.REPORT).read_text())
    assert doc["pinned"] == {"tensorrt_llm": "1.2.1", "tensorrt": "10.14"}
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["environment"]["status"] == "error"
    assert checks["environment"]["detail"].startswith("UnsupportedVersionError: ")
    assert all(checks[n]["status"] == "skip" for n in vt.CHECKS[1:])  # nothing ran against the wrong release


def test_version_gate_accepts_the_pinned_release_and_refuses_others(vt, tmp_path):
    from tide_trt.engine.trtllm_engine import UnsupportedVersionError, check_supported_versions, version_matches

    args = vt.parse_args(["--work-dir", str(tmp_path)])
    for trtllm, trt in (("1.2.1", "10.14.1.48"), ("1.2.1.post1", "10.14.1")):
        assert vt.Validation(args, stack(vt, trtllm, trt)).environment() == {"tensorrt_llm": trtllm, "tensorrt": trt}
    refused = {
        ("0.21.0", "10.11.0.33"): ["TensorRT-LLM 0.21.0 (older", "TensorRT 10.11.0.33"],
        ("1.2.0", "10.14.1.48"): ["TensorRT-LLM 1.2.0 (older"],
        ("1.2.10", "10.14.1.48"): ["TensorRT-LLM 1.2.10 (newer"],
        ("1.2.1", "11.4.0.106"): ["TensorRT 11.4.0.106 (TensorRT-LLM 1.2.1 requires tensorrt~=10.14.1)"],
    }
    for (trtllm, trt), parts in refused.items():
        with pytest.raises(UnsupportedVersionError) as err:
            vt.Validation(args, stack(vt, trtllm, trt)).environment()
        assert all(p in str(err.value) for p in parts), str(err.value)
    check_supported_versions("1.2.1", "10.14")
    assert version_matches("10.14.1.48", "10.14") and not version_matches("10.140", "10.14")


def test_the_trtllm_extra_pins_what_the_gate_accepts():
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11

    from tide_trt.engine.trtllm_engine import SUPPORTED_TENSORRT, SUPPORTED_TRTLLM

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trtllm"]
    assert f"tensorrt-llm=={SUPPORTED_TRTLLM}" in extra
    assert f"tensorrt~={SUPPORTED_TENSORRT}.1" in extra


# --- the measures and the spec-vs-plain verdict (issue 19, item 5) ----------------------------------------------
def test_per_channel_error_sees_drift_that_an_outlier_channel_hides(vt):
    """Llama's residual stream has a few channels ~100x the others: a 5 % drift in an ordinary channel is 5e-4 of
    the global max |x| (under the float32 tolerance), and 5 % of its own channel."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(12, 3, 64, generator=gen)  # [n, C, H] captured states
    want[:, :, 7] *= 100.0  # an outlier channel
    got = want.clone()
    got[:, 1, 20] *= 1.05  # drift in an ordinary channel
    assert vt.global_rel_error(got, want) < vt.TOLERANCES["float32"][1]
    assert vt.per_channel_rel_error(got, want) == pytest.approx(0.05, rel=1e-3)
    assert vt.per_channel_rel_error(want, want) == 0.0
    silent = want.clone()
    silent[:, 0, 3] = 0.0  # a channel silent on these positions: its scale is floored, not ~0
    noisy = silent.clone()
    noisy[:, 0, 3] = 1e-6
    assert vt.per_channel_rel_error(noisy, silent) < 1e-3


def _pair(vt, plain, spec, margins=None, drafted=6, accepted=3):
    return vt.DecodePair(plain, spec, margins if margins is not None else [1.0] * len(plain), drafted, accepted)


def test_spec_vs_plain_verdict(vt):
    ok = vt.judge_spec_vs_plain([_pair(vt, [1, 2, 3], [1, 2, 3]), _pair(vt, [4, 5], [4, 5])], 3)
    assert ok["identical"] == 2 and ok["accepted"] == 6 and ok["drafted"] == 12
    near = vt.judge_spec_vs_plain([_pair(vt, [1, 2, 3], [1, 9, 3], margins=[1.0, 0.01, 1.0])], 3)
    assert near["near_tie"] == 1
    with pytest.raises(vt.CheckFailed, match="at token 1 .not a near-tie"):
        vt.judge_spec_vs_plain([_pair(vt, [1, 2, 3], [1, 9, 3])], 3)
    with pytest.raises(vt.CheckFailed, match="no draft token was accepted"):  # identical, but nothing verified
        vt.judge_spec_vs_plain([_pair(vt, [1, 2, 3], [1, 2, 3], accepted=0)] * 2, 3)


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _cpu_validation(vt, tmp_path, ckpt, engine, prompts, draft=""):
    """Validation's checks with the TensorRT-LLM engine stood in for by a CPU torch engine (the seam is
    `_engines`; the reference engine of `target_vs_torch` comes from `engine_cfg`)."""
    from tide_trt.config import EngineConfig

    class CpuValidation(vt.Validation):
        def _engines(self):
            return ckpt, _Tok(), engine

        def engine_cfg(self, **over):
            return EngineConfig(dtype="float32", max_batch_size=4, max_seq_len=128, cpu_kernels="off")

        def prompt_ids(self):
            return prompts

    args = vt.parse_args(["--work-dir", str(tmp_path), "--draft", draft, "--dtype", "float32", "--gamma", "3",
                          "--max-tokens", "16"])
    return CpuValidation(args)


def _one_token_draft(engine, token: int, out):
    """A real EAGLE-3 checkpoint whose draft vocabulary is the single target token `token`: it always proposes it."""
    import torch

    from tide_trt.draft.checkpoint import save_draft
    from tide_trt.training.offline import new_head

    torch.manual_seed(0)
    return str(save_draft(new_head(engine, torch.tensor([token])), out, {"version": 1}))


@pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)
def test_spec_vs_plain_fails_on_a_draft_that_is_never_accepted(vt, tmp_path, tiny_checkpoint):
    """A draft proposing only a token the target never emits on these prompts gives identical outputs (the
    target decodes alone): the check must fail. One proposing the target's most frequent output token is
    accepted where the target emits it, and passes."""
    from collections import Counter

    from tests.conftest import make_engine, random_prompts

    engine = make_engine(tiny_checkpoint, max_batch_size=4, max_seq_len=128)
    prompts = random_prompts(2, 96, seed=5, min_len=4, max_len=12)
    probe = _cpu_validation(vt, tmp_path, tiny_checkpoint, engine, prompts)
    emitted = Counter(t for p in prompts for t in probe._decode(0, p)[0])
    never = next(t for t in range(3, engine.info.vocab_size) if t not in emitted)
    frequent = emitted.most_common(1)[0][0]

    bad = _cpu_validation(vt, tmp_path, tiny_checkpoint, engine, prompts,
                          _one_token_draft(engine, never, tmp_path / "never"))
    with pytest.raises(vt.CheckFailed, match="no draft token was accepted"):
        bad.spec_vs_plain()
    good = _cpu_validation(vt, tmp_path, tiny_checkpoint, engine, prompts,
                           _one_token_draft(engine, frequent, tmp_path / "frequent"))
    metrics = good.spec_vs_plain()
    assert metrics["identical"] == len(prompts) and 0 < metrics["accepted"] < metrics["drafted"], metrics


class _DriftingEngine:
    """The engine under test with one ordinary captured-state channel drifted by `factor` (everything else the
    engine's own): what a kernel bug in one channel of the TensorRT engine would look like."""

    def __init__(self, engine, channel: tuple[int, int], factor: float):
        self.engine, self.channel, self.factor = engine, channel, factor

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward(self, slots, tokens, logits="last"):
        out = self.engine.forward(slots, tokens, logits=logits)
        hidden = out.hidden.clone()  # [B, T, C, H]
        hidden[:, :, self.channel[0], self.channel[1]] *= self.factor
        return type(out)(out.logits, hidden)


@pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)
def test_target_vs_torch_judges_states_per_channel(vt, tmp_path, tiny_checkpoint):
    """The check on CPU, the stand-in engine a drifting copy of the reference, on a target with an outlier
    channel like Llama's (one embedding column set to 200, carried by the residual stream into every state):
    1 % drift in an ordinary channel is under the float32 tolerance of max |Δ| / max |x| and must fail; no drift
    passes."""
    import dataclasses

    import torch

    from tests.conftest import make_engine, random_prompts

    state = dict(tiny_checkpoint.state)
    embed = state["model.embed_tokens.weight"].clone()
    embed[:, 5] = 200.0  # every token: a massive activation in channel 5 of every captured state
    state["model.embed_tokens.weight"] = embed
    ckpt = dataclasses.replace(tiny_checkpoint, state=state)
    prompts = random_prompts(3, 96, seed=9, min_len=4, max_len=12)
    engine = make_engine(ckpt, max_batch_size=4, max_seq_len=128)
    slot = engine.allocate_slot()
    states = engine.forward([slot], [prompts[0]]).hidden[0]  # [T, C, H]
    engine.free_slot(slot)
    scale = states.abs().amax(0)  # [C, H]
    assert states[:, :, 5].abs().min() > 20 * scale.median()  # the outlier channel, at every position
    ordinary = (1, int(scale[1].argsort()[scale.shape[1] // 2]))  # a median channel of the middle capture layer
    factor = 1.01
    drifted = states.clone()
    drifted[:, ordinary[0], ordinary[1]] *= factor
    tol = vt.TOLERANCES["float32"][1]
    assert vt.global_rel_error(drifted, states) < tol < vt.per_channel_rel_error(drifted, states)

    same = _cpu_validation(vt, tmp_path, ckpt, engine, prompts).target_vs_torch()
    assert same["hidden_rel_per_channel"] == 0.0 and same["top1_agree"] == 1.0
    drifting = _cpu_validation(vt, tmp_path, ckpt, _DriftingEngine(engine, ordinary, factor), prompts)
    with pytest.raises(vt.CheckFailed, match="hidden per channel") as failed:
        drifting.target_vs_torch()
    assert "'hidden_rel_global': " in str(failed.value)
    assert torch.isfinite(states).all()

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

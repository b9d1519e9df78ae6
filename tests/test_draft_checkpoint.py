"""Draft checkpoints: safetensors round trip, atomic save, and refusal of drafts made for another target."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.conftest import make_engine
from tide_trt.draft.checkpoint import CONFIG, WEIGHTS, load_draft, save_draft
from tide_trt.errors import CheckpointError
from tide_trt.training.offline import new_head


@pytest.fixture()
def engine(tiny_checkpoint):
    return make_engine(tiny_checkpoint)


@pytest.fixture()
def head(engine):
    torch.manual_seed(0)
    return new_head(engine, torch.arange(48))


def test_round_trip(tmp_path, engine, head):
    out = save_draft(head, tmp_path / "d", {"version": 3, "trained_by": "test"})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    loaded, manifest = load_draft(out, engine.info, engine.embedding_weight())
    assert manifest["version"] == 3 and "created" in manifest
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=False):
        assert torch.equal(a, b), name
    assert loaded.embed is engine.embedding_weight()  # shared, frozen, never saved
    assert not any("embed." in k for k in loaded.state_dict())


def _edit_config(path, **changes):
    doc = json.loads((path / CONFIG).read_text())
    doc["architecture"].update(changes)
    (path / CONFIG).write_text(json.dumps(doc))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 128, "hidden size"),
    ("target_vocab_size", 1000, "vocabulary"),
    ("capture_layers", [1, 2, 3], "capture layers"),
    ("model_fingerprint", "0000", "fingerprint"),
])
def test_mismatched_draft_refused(tmp_path, engine, head, field, value, message):
    out = save_draft(head, tmp_path / "d", {"version": 1})
    _edit_config(out, **{field: value})
    with pytest.raises(CheckpointError, match=message):
        load_draft(out, engine.info, engine.embedding_weight())


def test_corrupt_and_missing_files(tmp_path, engine, head):
    with pytest.raises(CheckpointError, match="not found"):
        load_draft(tmp_path / "nope", engine.info, engine.embedding_weight())
    out = save_draft(head, tmp_path / "d", {"version": 1})
    (out / WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_draft(out, engine.info, engine.embedding_weight())
    (out / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_draft(out, engine.info, engine.embedding_weight())


def test_nan_and_wrong_shape_weights_refused(tmp_path, engine, head):
    with torch.no_grad():
        head.fc.weight[0, 0] = float("nan")
    out = save_draft(head, tmp_path / "nan", {"version": 1})
    with pytest.raises(CheckpointError, match="NaN"):
        load_draft(out, engine.info, engine.embedding_weight())
    bigger = new_head(engine, torch.arange(60))
    out2 = save_draft(bigger, tmp_path / "shape", {"version": 1})
    _edit_config(out2, draft_vocab_size=48)  # config claims 48, tensors hold 60
    with pytest.raises(CheckpointError, match="shape"):
        load_draft(out2, engine.info, engine.embedding_weight())


def test_save_is_atomic_on_failure(tmp_path, engine, head, monkeypatch):
    out = save_draft(head, tmp_path / "d", {"version": 1})
    before = (out / WEIGHTS).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tide_trt.draft.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_draft(head, out, {"version": 2})
    assert (out / WEIGHTS).read_bytes() == before  # the published version is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_config_records_architecture(tmp_path, head):
    out = save_draft(head, tmp_path / "d", {"version": 1})
    arch = json.loads((out / CONFIG).read_text())["architecture"]
    assert replace(head.cfg).to_dict() == arch

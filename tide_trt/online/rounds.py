"""The record of one training round: what the trainer decided and why (one line of the draft store's rounds.jsonl).

Written by the trainer process (`online/trainer.py`), read by the serving side (`online/adaptation.py` applies its
Algorithm 1 decision to the drift detector) and by `tide drafts`. Acceptance values are per-token α (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tide_trt.online.drift import Decision


@dataclass(frozen=True)
class RoundRecord:
    """One training round (no tensors). `to_json` / `from_json` map it to its rounds.jsonl line."""

    deploy: bool
    pause_collection: bool
    reason: str  # "improved" | "plateau" | "no_improvement"
    why: str = ""  # the decision in words, with its numbers (why a round did or did not deploy)
    gain: float = 0.0  # eval α of the new draft − the baseline α
    required_gain: float = 0.0
    baseline: str = ""  # what the gain is measured against: "served" | "parent_eval" | "max"
    eval_acceptance: float | None = None  # held-out α of the new draft
    parent_eval_acceptance: float | None = None  # held-out α of the draft it was trained from
    served_acceptance: float | None = None  # α the served requests of the training data saw
    served_trials: int = 0
    eval: dict[str, float] = field(default_factory=dict)  # ChainAcceptance.as_dict() of the new draft
    parent_eval: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # sequence / token counts of the round
    training: dict[str, Any] = field(default_factory=dict)  # fit() history
    round: int | None = None  # 1-based round number in the store
    parent: int | None = None  # draft version trained from
    version: int | None = None  # the published version (None: not deployed)
    shards: list[str] = field(default_factory=list)  # signal shards consumed
    skipped_shards: list[str] = field(default_factory=list)  # unreadable shards (also consumed)
    time: float | None = None  # set by DraftStore.append_round

    @property
    def decision(self) -> Decision:
        return Decision(self.deploy, self.pause_collection, self.reason, self.gain, self.required_gain)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["time"] is None:
            del out["time"]
        return out

    @classmethod
    def from_json(cls, line: dict[str, Any]) -> RoundRecord:
        """Tolerant of older lines: unknown keys are ignored, missing ones take their defaults."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in line.items() if k in names}
        kwargs["deploy"] = bool(line.get("deploy"))
        kwargs["pause_collection"] = bool(line.get("pause_collection"))
        kwargs["reason"] = str(line.get("reason", ""))
        kwargs["gain"] = float(line.get("gain") or 0.0)
        kwargs["required_gain"] = float(line.get("required_gain") or 0.0)
        return cls(**kwargs)

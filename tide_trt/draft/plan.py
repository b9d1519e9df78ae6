"""How one step drafts: the single description a policy hands the step loop (`SpeculativeGenerator.step`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class StepDrafting:
    """gamma: the EAGLE-3 head's draft length (0: the head does not draft); rows: the requests the head drafts for
    (None: all of them; a controller's probe: a few); gammas: per-request draft lengths overriding gamma;
    index_off_rows: rows the head does not draft for (γ = 0, or outside `rows`) still draft where the suffix index
    is confident — the head is off, the nearly free index is not (a controller's index-only steps); without it
    γ = 0 is plain decoding. Rows the head drafts for always consult the index when the drafter has one."""

    gamma: int = 0
    rows: Collection[str] | None = None
    gammas: Mapping[str, int] | None = None
    index_off_rows: bool = False

    def head_gamma(self, request_id: str) -> int:
        """The head's draft length for this request."""
        if self.gammas is not None and request_id in self.gammas:
            return self.gammas[request_id]
        return self.gamma if self.rows is None or request_id in self.rows else 0

    def overridden(self, request_id: str) -> bool:
        return self.gammas is not None and request_id in self.gammas

    @property
    def drafts(self) -> bool:
        """Whether any row may draft this step."""
        return self.gamma > 0 or self.index_off_rows or bool(self.gammas and any(g > 0 for g in self.gammas.values()))

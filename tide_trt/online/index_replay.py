"""Where a hybrid drafter's suffix index would draft, replayed over stored sequences (the deploy gate's view).

Serving with `draft.suffix` drafts a row from the index when its proposal's first-token confidence reaches
`prefer_confidence`, else from the EAGLE-3 head. A new head therefore changes only the positions the index leaves
to it, and what serving gains from it is its acceptance *there*, weighted by their share — not its acceptance
over every position (the index would have drafted many of them, often better), and not the served acceptance
recorded with the signals (which mixes index rows into it).

`replay_index` walks each held-out sequence as serving would: at every chain base q (the target has said tokens
[0, q+1], the next token is the label) the request's own index holds the sequence so far and the global index holds
what was served before; the base is an *index base* where the proposal is confident (its accepted length is counted
against the stored tokens, up to its own length) and a *head base* otherwise. The masks it returns select the head
bases for `simulated_acceptance`; `serving_tau` mixes the two sources into the tokens per verification step the
hybrid would serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tide_trt.draft.suffix import SuffixDrafter
from tide_trt.online.signals import SignalSequence
from tide_trt.training.ttt import ChainAcceptance


@dataclass(frozen=True)
class IndexReplay:
    head_bases: list[torch.Tensor]  # per sequence [T] bool: chain bases the head drafts (index not confident)
    index_chains: int  # chain bases the index drafts
    index_accepted: int  # Σ accepted index drafts over those bases (matched against the stored tokens)
    index_drafted: int  # Σ drafted index tokens

    @property
    def index_tau(self) -> float:
        return 1.0 + self.index_accepted / self.index_chains if self.index_chains else 1.0

    def index_share(self, head: ChainAcceptance) -> float:
        """Share of the chain bases the index drafts (against the head's chains of an evaluation)."""
        total = self.index_chains + head.chains
        return self.index_chains / total if total else 0.0

    def serving_tau(self, head: ChainAcceptance) -> float:
        """Tokens per verification step of the hybrid: index chains and the head's chains, by their counts."""
        total = self.index_chains + head.chains
        if not total:
            return 1.0
        return (self.index_chains + self.index_accepted + head.chains + head.accepted) / total


def replay_index(seqs: list[SignalSequence], drafter: SuffixDrafter, train_on_prompt: bool = False
                 ) -> IndexReplay:
    """Replay the index over `seqs` (slot 0 of `drafter`, reset per sequence; its global index is read, not
    changed). Bases without a label (prompt text unless `train_on_prompt`) are neither head nor index bases."""
    cfg = drafter.config
    masks: list[torch.Tensor] = []
    chains = accepted = drafted = 0
    for s in seqs:
        tokens = s.token_ids.tolist()
        if s.next_token_id >= 0:
            tokens.append(int(s.next_token_id))
        labels = s.labels(train_on_prompt)  # [T]
        mask = torch.zeros(len(s.token_ids), dtype=torch.bool)  # [T]
        drafter.reset_slot(0)
        for q in range(len(s.token_ids) - 1):
            if labels[q + 1] < 0:  # base q predicts the token after row q+1: no label, not a base
                continue
            prefix = tokens[: q + 2]
            prop = drafter.propose(0, prefix, cfg.max_draft)
            if prop is None or prop.confidence[0] < cfg.prefer_confidence:
                mask[q] = True
                continue
            truth = tokens[q + 2: q + 2 + len(prop.tokens)]
            k = 0
            while k < len(truth) and prop.tokens[k] == truth[k]:
                k += 1
            chains += 1
            accepted += k
            drafted += len(prop.tokens)
        masks.append(mask)
    drafter.reset_slot(0)
    return IndexReplay(masks, chains, accepted, drafted)

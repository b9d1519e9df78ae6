"""N-gram lookup proposals (prompt-lookup decoding) to pair with the EAGLE-3 chain.

Small targets loop, and a one-layer draft head learns to copy slowly (`benchmarks/draft_copy_analysis.py`
measures both). Where the last `ngram` tokens occurred earlier in the sequence's own history (prompt + output),
the drafter proposes what followed their most recent earlier occurrence; elsewhere the head's chain.
Verification is unchanged (a lookup proposal is a draft with a one-hot distribution), so output stays lossless.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup_continuation(history: np.ndarray, ngram: int, gamma: int) -> list[int] | None:
    """history [L] token ids (prompt + output so far). If its last `ngram` tokens occur earlier, return the γ
    tokens that followed their most recent earlier occurrence (continuing into the repeated span itself when it
    runs past the end: a loop of period p keeps proposing the loop); else None."""
    n = len(history)
    if ngram < 1 or gamma < 1 or n <= ngram:
        return None
    windows = sliding_window_view(history[:-1], ngram)  # [L - ngram, ngram]: every earlier n-gram
    hits = np.flatnonzero((windows == history[-ngram:]).all(axis=1))
    if hits.size == 0:
        return None
    start = int(hits[-1]) + ngram  # the token after the most recent earlier occurrence
    out: list[int] = []
    for j in range(gamma):
        i = start + j
        out.append(int(history[i]) if i < n else out[i - n])
    return out

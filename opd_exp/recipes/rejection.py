"""Rejection filter for teacher-written traces (SPEC §2, off-policy cold start).

A trace is kept only if its answer is in a `\\boxed{}` and it shows none of the degenerate
repetitions long generations fall into:
- a line of at least 20 characters (stripped) seen 5 times or more;
- a 100-character string seen 3 times or more (overlapping windows);
- a 50-character block repeated 3 times in a row.
A rejected prompt is retried up to 3 times by the caller.
"""

from __future__ import annotations

from collections import Counter

from opd_exp.evaluation import last_boxed

LINE_CHARS, LINE_TIMES = 20, 5
NGRAM_CHARS, NGRAM_TIMES = 100, 3
BLOCK_CHARS, BLOCK_TIMES = 50, 3
REASONS = ("no_boxed", "repeated_line", "repeated_ngram", "repeated_block")


def rejection_reason(text: str) -> str | None:
    """Why `text` is rejected (one of REASONS), or None when it is kept."""
    if last_boxed(text) is None:
        return "no_boxed"
    lines = Counter(s for line in text.splitlines() if len(s := line.strip()) >= LINE_CHARS)
    if any(n >= LINE_TIMES for n in lines.values()):
        return "repeated_line"
    grams = Counter(text[i:i + NGRAM_CHARS] for i in range(len(text) - NGRAM_CHARS + 1))
    if any(n >= NGRAM_TIMES for n in grams.values()):
        return "repeated_ngram"
    span = BLOCK_CHARS * BLOCK_TIMES
    for i in range(len(text) - span + 1):
        block = text[i:i + BLOCK_CHARS]
        if all(text[i + j * BLOCK_CHARS:i + (j + 1) * BLOCK_CHARS] == block
               for j in range(1, BLOCK_TIMES)):
            return "repeated_block"
    return None

"""Scheduling decisions of the engine that need no engine state: which prompt chunks go into a
step, and how long adapter requests waited."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.forward_batch import PromptChunk
from server.sequence import Sequence


@dataclass
class WaitStats:
    admitted: int = 0
    total_wait_s: float = 0.0
    max_wait_s: float = 0.0

    def add(self, waited: float) -> None:
        self.admitted += 1
        self.total_wait_s += waited
        self.max_wait_s = max(self.max_wait_s, waited)


def schedule_chunks(prefilling: Iterable[Sequence], chunk_size: int, budget: int, *, long_prompt: int = 0,
                    decoding: bool = False) -> list[tuple[Sequence, PromptChunk]]:
    """Whole prompt chunks, oldest admitted request first, while they fit `budget` tokens; the
    oldest always gets one, so prompts advance however many rows decode. Chunk boundaries are
    fixed per request (multiples of `chunk_size`) whatever else is scheduled, so a prompt's
    numbers never depend on its neighbours; many short prompts share one step, and a long one
    yields the step to running streams after each chunk. While rows are `decoding`, prompts longer
    than `long_prompt` tokens (0: no limit) put at most one chunk in all into a step: a step then
    costs the decode rows plus one chunk, so running streams keep their pace while long prompts
    arrive; short prompts still share the rest of the budget."""
    out: list[tuple[Sequence, PromptChunk]] = []
    limit_long = decoding and long_prompt > 0
    long_taken = False
    for seq in prefilling:
        is_long = limit_long and seq.prefill_len > long_prompt
        if is_long and long_taken:
            continue
        start = seq.prefilled
        while start < seq.prefill_len:
            size = min(chunk_size, seq.prefill_len - start)
            if size > budget and out:
                return out
            ids = seq.prefill_ids[start : start + size]
            out.append((seq, PromptChunk(seq.row, ids, start, start + size == seq.prefill_len)))
            budget -= size
            start += size
            if is_long:
                long_taken = True
                break
    return out

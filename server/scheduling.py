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


def schedule_chunks(prefilling: Iterable[Sequence], chunk_size: int, budget: int) -> list[tuple[Sequence, PromptChunk]]:
    """Whole prompt chunks, oldest admitted request first, while they fit `budget` tokens; the
    oldest always gets one, so prompts advance however many rows decode. Chunk boundaries are
    fixed per request (multiples of `chunk_size`) whatever else is scheduled, so a prompt's
    numbers never depend on its neighbours; many short prompts share one step, and a long one
    yields the step to running streams after each chunk."""
    out: list[tuple[Sequence, PromptChunk]] = []
    for seq in prefilling:
        start = seq.prefilled
        while start < seq.prompt_len:
            size = min(chunk_size, seq.prompt_len - start)
            if size > budget and out:
                return out
            ids = seq.request.prompt_ids[start : start + size]
            out.append((seq, PromptChunk(seq.row, ids, start, start + size == seq.prompt_len)))
            budget -= size
            start += size
    return out

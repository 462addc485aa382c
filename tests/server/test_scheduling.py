"""Which prompt chunks a step carries (server/scheduling.py), on sequences alone: the budget, the
oldest prompt always advancing, fixed chunk boundaries, and long prompts held to one chunk per
step while rows decode."""

from __future__ import annotations

from server.scheduling import schedule_chunks
from server.sequence import GenerationRequest, Sequence


def seq(rid: str, length: int, row: int, prefilled: int = 0) -> Sequence:
    s = Sequence(GenerationRequest(rid, list(range(length)), max_tokens=4), eos_ids=frozenset(), max_len=4096)
    s.row, s.prefilled = row, prefilled
    return s


def plan(seqs: list[Sequence], budget: int, **kwargs: object) -> list[tuple[str, int, int]]:
    return [(s.request_id, c.start, len(c.token_ids)) for s, c in schedule_chunks(seqs, 32, budget, **kwargs)]  # type: ignore[arg-type]


def test_chunks_fill_the_budget_oldest_first_on_fixed_boundaries() -> None:
    prompts = [seq("a", 70, 0, prefilled=32), seq("b", 20, 1), seq("c", 50, 2)]
    assert plan(prompts, 128) == [("a", 32, 32), ("a", 64, 6), ("b", 0, 20), ("c", 0, 32), ("c", 32, 18)]
    assert plan(prompts, 40) == [("a", 32, 32), ("a", 64, 6)]  # the next chunk would not fit
    assert plan(prompts, 8) == [("a", 32, 32)]  # the oldest advances even past the budget


def test_long_prompts_put_one_chunk_into_a_step_while_rows_decode() -> None:
    prompts = [seq("long1", 1500, 0), seq("short", 40, 1), seq("long2", 900, 2)]
    assert plan(prompts, 128, long_prompt=256, decoding=True) == [("long1", 0, 32), ("short", 0, 32), ("short", 32, 8)]
    # Nobody decodes: nobody waits on a step, so long prompts fill the budget like short ones.
    assert plan(prompts, 128, long_prompt=256, decoding=False) == [
        ("long1", 0, 32), ("long1", 32, 32), ("long1", 64, 32), ("long1", 96, 32)]
    assert plan(prompts, 128, long_prompt=0, decoding=True) == plan(prompts, 128, decoding=False)  # 0: off


def test_a_short_prompt_behind_long_ones_still_advances() -> None:
    prompts = [seq("long", 1500, 0), seq("long2", 600, 1), seq("short", 8, 2), seq("next", 9, 3)]
    assert plan(prompts, 40, long_prompt=256, decoding=True) == [("long", 0, 32), ("short", 0, 8)]

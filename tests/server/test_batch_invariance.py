"""Batch invariance: a row's decode logits are bit-identical alone or among any other rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from server.linear import onednn_packing_available
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.weights import build_model
from tests.server.test_adapter_scheduling import random_adapters

GREEDY = SamplingParams(temperature=0)


class LogitTap:
    """Records the logits each decode step hands to sampling, per cache row."""

    def __init__(self, runner: ModelRunner) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}
        inner = runner._sample

        def tap(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            for row, values in zip(rows, logits):
                self.rows.setdefault(row, []).append(values.clone())
            return inner(logits, rows)

        runner._sample = tap  # type: ignore[method-assign]


def decode_logits(runner: ModelRunner, target: tuple[int, list[int], int | None], others: list[tuple[int, list[int], int | None]], steps: int = 6) -> torch.Tensor:
    """Prefill target and others (row, prompt, slot), decode them together; the target's logits."""
    for row, prompt, slot in [target, *others]:
        runner.reset_row(row, GREEDY, seed=0, slot=slot)
        runner.prefill(row, prompt, start=0, last=True)
    tap = LogitTap(runner)
    rows = [target[0]] + [row for row, _, _ in others]
    for _ in range(steps):
        runner.decode(rows)
    for row in rows:
        runner.free_row(row)
    del runner._sample  # back to the class method
    return torch.stack(tap.rows[target[0]])  # [steps, V]


@pytest.mark.parametrize("pack", [True, False], ids=["packed-buckets", "fixed-rows"])
def test_row_logits_do_not_depend_on_neighbours(tiny_dir: Path, pack: bool) -> None:
    if pack and not onednn_packing_available():
        pytest.skip("this torch build has no oneDNN weight packing: the server runs fixed rows (the other case)")
    model = build_model(tiny_dir, dtype=torch.float32, device="cpu", max_rows=8, max_len=256, pack=pack)
    assert model.all_packed() is pack
    bank = SlotBank(model, num_slots=3, max_rank=8)
    for slot, weights in enumerate(random_adapters(bank, 3).values()):
        bank.load(slot, weights)
    runner = ModelRunner(model, bank)
    assert runner.fixed_rows is not pack
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, 90, (n,), generator=g).tolist()

    for slot in (None, 1):
        target = (0, prompt(20), slot)
        alone = decode_logits(runner, target, [])
        crowds = [
            [(1, prompt(3), None)],  # more rows, same window
            [(1, prompt(150), 0), (2, prompt(9), 2), (5, prompt(40), 1)],  # wider window, more rows, adapters
            [(r, prompt(5 + 7 * r), r % 4 if r % 4 < 3 else None) for r in range(1, 8)],  # every row
        ]
        for others in crowds:
            assert torch.equal(decode_logits(runner, target, others), alone), (slot, len(others))
        # The same request on another row gives the same bits too.
        assert torch.equal(decode_logits(runner, (6, target[1], slot), [(0, prompt(30), 0)]), alone)



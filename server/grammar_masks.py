"""Structured outputs on the tensor side: one grammar matcher per constrained row, and its token
mask applied to that row's logits only (server/structured.py compiles the grammars).

A mask is xgrammar's bitmask: int32 words, bit j of word w allowing token 32 w + j. Columns the
mask does not cover (tokens past the grammar's vocabulary, e.g. an adapter's added tokens) are
never allowed. Rows without a grammar are not touched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

_BITS = torch.arange(32, dtype=torch.int32)  # [32]


class GrammarRefusedError(RuntimeError):
    """The grammar refused a token (it can only happen when every token was masked out)."""


SLOW_FILL_S = 0.05  # one row's mask taking longer than this on SLOW_FILLS steps in a row ends it
SLOW_FILLS = 3


class GrammarState:
    """One row's matcher: what it may sample next, and the tokens it sampled."""

    def __init__(self, compiled: Any, stop_ids: Sequence[int], history: Sequence[int] = ()) -> None:
        import xgrammar as xgr

        self.vocab = compiled.tokenizer_info.vocab_size
        # The request's own stop ids end the grammar (EOS unless ignore_eos, and stop_token_ids);
        # ids past the grammar's vocabulary (an adapter's added tokens) are never allowed anyway.
        stops = [t for t in stop_ids if 0 <= t < self.vocab]
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None)
        self.too_slow = False  # its masks cost too much: the row is ended (one row must not slow all)
        self._slow = 0  # consecutive slow fills
        for token in history:  # a resumed request: replay what it generated before
            self.accept(token)

    def fill(self, masks: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into row `index` of `masks` (allocate_masks). A matcher
        that fails allows nothing (its row alone is refused); one whose masks keep taking more
        than SLOW_FILL_S (a regex with nested repetition grows per token) is marked too_slow and
        not asked again."""
        if self.too_slow:
            masks[index] = 0
            return
        start = time.perf_counter()
        try:
            self.matcher.fill_next_token_bitmask(masks, index)
        except Exception:  # e.g. a matcher already terminated: this row only
            masks[index] = 0
            return
        self._slow = self._slow + 1 if time.perf_counter() - start > SLOW_FILL_S else 0
        self.too_slow = self._slow >= SLOW_FILLS

    def accept(self, token: int) -> None:
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            raise GrammarRefusedError(f"token {token} does not continue the requested format")


def allocate_masks(rows: int, vocab: int) -> torch.Tensor:
    """Room for `rows` bitmasks of a `vocab`-token grammar # [rows, ceil(vocab / 32)] int32."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab)


def unpack_masks(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Bitmasks # [c, W] int32 -> allowed # [c, width] bool (False past 32 W)."""
    bits = ((masks[:, :, None] >> _BITS.to(masks.device)) & 1).bool().flatten(1)  # [c, 32 W]
    if bits.shape[1] >= width:
        return bits[:, :width]
    return torch.nn.functional.pad(bits, (0, width - bits.shape[1]), value=False)


def apply_masks(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> torch.Tensor:
    """`logits` # [n, V] with rows `rows` masked by `masks` # [len(rows), W] (disallowed: -inf);
    a new tensor, the other rows' values unchanged."""
    allowed = unpack_masks(masks.to(logits.device), logits.shape[-1])  # [c, V]
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    out = logits.clone()
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out

"""Module slots: whole copies of the embedding and the output head (PEFT's modules_to_save).

An adapter that retrains the embedding or the head (often because it adds tokens) saves them
whole: vocabulary x hidden each, as large as the base model's own, so they cannot live in the
LoRA slots. They get M slots of their own, each holding one adapter's embedding and head with
room for `max_vocab` rows (the base vocabulary plus --max-added-tokens), evicted least recently
used like LoRA slots (the engine keeps a second slot table for them). This module owns the
tensors and is their only writer; the model reads them for the rows routed to a slot:

* embedding: tokens of such rows are looked up in the slot's copy instead of the base table;
* head: such a row's logits are its hidden state times the slot's head, one row at a time (a
  fixed row count, so a row's logits never depend on its neighbours);
* vocabulary: every row gets `max_vocab` columns (the base vocabulary plus --max-added-tokens,
  whatever its neighbours use, so sampling reduces over the same length alone or in a batch);
  columns a row's vocabulary lacks hold PAD_LOGIT, which no sampling ever picks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from adapters.validation import FullModules

# A logit no sampler picks (exp underflows to 0 at any temperature) that still sums to a finite
# number over a row, so the runner's one-reduction finiteness check keeps working.
PAD_LOGIT = -1e30


def module_slot_bytes(max_vocab: int, hidden: int, dtype_bytes: int) -> int:
    """One module slot: an embedding and a head of max_vocab x hidden."""
    return 2 * max_vocab * hidden * dtype_bytes


class ModuleBank:
    def __init__(self, *, num_slots: int, vocab: int, max_vocab: int, hidden: int, dtype: torch.dtype,
                 embed_device: torch.device, head_device: torch.device, base_embed: torch.Tensor | None = None) -> None:
        """`base_embed` # [vocab, hidden]: what trainable tokens start from (None: not served)."""
        if num_slots < 1 or max_vocab < vocab:
            raise ValueError("a module bank needs a slot and at least the base vocabulary")
        self.num_slots, self.vocab, self.max_vocab = num_slots, vocab, max_vocab
        self.base_embed = base_embed
        self.embed = torch.zeros(num_slots, max_vocab, hidden, dtype=dtype, device=embed_device)
        self.head = torch.zeros(num_slots, max_vocab, hidden, dtype=dtype, device=head_device)
        self.rows = [0] * num_slots  # the vocabulary of the adapter in each slot (0: empty)
        self.has_embed = [False] * num_slots
        self.has_head = [False] * num_slots

    @property
    def bytes(self) -> int:
        return self.embed.numel() * self.embed.element_size() + self.head.numel() * self.head.element_size()

    @torch.no_grad()
    def load(self, slot: int, full: FullModules) -> None:
        """Write an adapter's copies into `slot` (rows past its vocabulary are never read)."""
        if not 0 <= slot < self.num_slots or full.vocab > self.max_vocab:
            raise ValueError("adapter was not validated against this module bank")
        for table, copy in ((self.embed, full.embed), (self.head, full.head)):
            if copy is not None:
                table[slot, : full.vocab].copy_(copy)
        if full.token_ids is not None and full.token_rows is not None:  # trainable tokens
            if self.base_embed is None:
                raise ValueError("this module bank cannot serve trainable tokens")
            embed = self.embed[slot, : self.vocab]  # [vocab, hidden]
            embed.copy_(self.base_embed)
            embed.index_copy_(0, full.token_ids.to(embed.device), full.token_rows.to(embed.device))
            if full.tied_head:
                self.head[slot, : self.vocab].copy_(embed)
        self.rows[slot] = full.vocab
        self.has_embed[slot], self.has_head[slot] = full.has_embed, full.has_head

    def clear(self, slot: int) -> None:
        self.rows[slot], self.has_embed[slot], self.has_head[slot] = 0, False, False

    def embeds(self, slot: int | None) -> bool:
        return slot is not None and self.has_embed[slot]

    def embed_tokens(self, x: torch.Tensor, tokens: torch.Tensor, flat: torch.Tensor,
                     offsets: torch.Tensor) -> torch.Tensor:
        """x # [T, hidden] (the base embedding) with tokens `flat` # [n] looked up in their slot's
        copy instead; offsets # [n] = slot * max_vocab of each."""
        table = self.embed.view(-1, self.embed.shape[-1])  # [M * max_vocab, hidden]
        rows = table.index_select(0, tokens.index_select(0, flat) + offsets)  # [n, hidden]
        return x.index_copy(0, flat, rows.to(x.device))

    def logits(self, logits: torch.Tensor, hidden: torch.Tensor, slots: Sequence[int | None],
               post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The step's logits # [n, max_vocab]: the base head's `logits` # [n, vocab] for rows
        without a head copy, each other row through its slot's head (then `post`, the model's
        final scaling), padded with PAD_LOGIT past each row's vocabulary. hidden # [n, hidden]"""
        width = self.max_vocab
        heads = [i for i, s in enumerate(slots) if s is not None and self.has_head[s]]
        if width == logits.shape[-1] and not heads:
            return logits
        out = logits.new_full((logits.shape[0], width), PAD_LOGIT)
        out[:, : logits.shape[-1]] = logits
        for i in heads:
            slot = slots[i]
            assert slot is not None
            rows = self.rows[slot]
            head = self.head[slot, :rows]  # [rows, hidden]
            out[i, :rows] = post(F.linear(hidden[i : i + 1].to(head.device, head.dtype), head).float())[0].to(out.device)
            out[i, rows:] = PAD_LOGIT
        return out

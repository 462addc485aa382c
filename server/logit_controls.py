"""Per-row logit controls applied before sampling: min_tokens, logit_bias and the three penalties.

Each row carries its own controls; a row without any is not touched, so its logits (and tokens)
are bit-identical to a step without controls. Semantics, in the order applied (vLLM applies
these in this order too):

* min_tokens: until a row has generated that many tokens its stop ids (EOS unless ignore_eos,
  and stop_token_ids) get -inf (transformers' MinNewTokensLengthLogitsProcessor);
* bad_words: a word's last token gets -inf when the row has just generated the rest of it (a
  one-token word: always); the row's generated tokens only, as vLLM (transformers'
  NoBadWordsLogitsProcessor over them);
* logit_bias: added to the chosen tokens' logits (OpenAI; transformers' SequenceBiasLogitsProcessor
  with one-token sequences);
* repetition_penalty p over prompt and output tokens: a positive logit is divided by p, a
  negative one multiplied (transformers' RepetitionPenaltyLogitsProcessor, vLLM);
* frequency_penalty f and presence_penalty r over output tokens: logit - f * count - r * (count > 0)
  (OpenAI's definition, as vLLM applies it).

min_p filters the distribution after temperature, top-k and top-p (transformers' order) and lives
in server/sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitControls:
    """One row's controls (all off by default)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never generated

    @property
    def penalized(self) -> bool:
        """Whether the row needs its token counts (penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def active(self) -> bool:
        return self.penalized or self.min_tokens > 0 or bool(self.logit_bias) or bool(self.bad_words)

    @property
    def needs_history(self) -> bool:
        """Whether the row needs its generated tokens (a bad word longer than one token)."""
        return any(len(word) > 1 for word in self.bad_words)


@dataclass(frozen=True)
class RowControls:
    """One row's controls as device tensors, built once when the row starts (a step only indexes)."""

    controls: LogitControls
    stop: torch.Tensor | None  # [s] int64: ids min_tokens holds back (within the logits)
    bias_ids: torch.Tensor | None  # [b] int64
    bias: torch.Tensor | None  # [b] float32
    banned: torch.Tensor | None = None  # [w] int64: one-token bad words (within the logits)

    @classmethod
    def build(cls, controls: LogitControls, stop_ids: tuple[int, ...], vocab: int, device: torch.device) -> RowControls:
        stop = [i for i in stop_ids if i < vocab] if controls.min_tokens > 0 else []
        ids = [i for i, _ in controls.logit_bias]
        banned = sorted({word[0] for word in controls.bad_words if len(word) == 1 and word[0] < vocab})
        return cls(
            controls,
            torch.tensor(stop, dtype=torch.int64, device=device) if stop else None,
            torch.tensor(ids, dtype=torch.int64, device=device) if ids else None,
            torch.tensor([b for _, b in controls.logit_bias], dtype=torch.float32, device=device) if ids else None,
            torch.tensor(banned, dtype=torch.int64, device=device) if banned else None,
        )


def banned_next(bad_words: tuple[tuple[int, ...], ...], generated: list[int], vocab: int) -> list[int]:
    """Last tokens of the multi-token bad words whose other tokens the row just generated
    (transformers' NoBadWordsLogitsProcessor over the generated tokens, as vLLM applies it)."""
    return [word[-1] for word in bad_words
            if len(word) > 1 and word[-1] < vocab and len(generated) >= len(word) - 1
            and tuple(generated[len(generated) - len(word) + 1 :]) == word[:-1]]


def apply_controls(logits: torch.Tensor, row: RowControls, *, generated: int, seen: torch.Tensor | None,
                   counts: torch.Tensor | None, history: list[int] | None = None) -> torch.Tensor:
    """One row's logits # [V] with its controls applied (a new tensor). `generated`: tokens it
    has generated so far; seen # [V] bool: tokens of its prompt and output; counts # [V]: how
    often it generated each token (both needed only when `controls.penalized`); `history`: the
    tokens it generated (needed only for bad words of several tokens)."""
    controls = row.controls
    out = logits.clone()
    if generated < controls.min_tokens and row.stop is not None:
        out[row.stop] = float("-inf")
    if row.banned is not None:
        out[row.banned] = float("-inf")
    if history is not None and controls.needs_history:
        banned = banned_next(controls.bad_words, history, out.shape[-1])
        if banned:
            out[torch.tensor(banned, dtype=torch.int64, device=out.device)] = float("-inf")
    if row.bias_ids is not None and row.bias is not None:
        out.index_add_(0, row.bias_ids, row.bias.to(out.dtype))
    if controls.repetition_penalty != 1.0 and seen is not None:
        p = controls.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if (controls.frequency_penalty or controls.presence_penalty) and counts is not None:
        out = out - controls.frequency_penalty * counts - controls.presence_penalty * (counts > 0).to(out.dtype)
    return out

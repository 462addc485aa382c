"""Per-row token sampling, vectorized over the rows of a batch.

Every row carries its own temperature, top_k, top_p and seed. Randomness comes from a counter-based
hash of (seed, step, vocabulary index) rather than a stateful generator, so a row's draw depends only
on its own seed and how many tokens it has generated: the same seed gives the same output whichever
rows share the step. Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)),
which draws from p without a cumulative sum or a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.logit_controls import LogitControls

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) draws keyed by (seed, step, index). seeds, steps: # [B] int64 -> # [B, vocab] float64"""
    index = torch.arange(vocab, dtype=torch.int64, device=seeds.device)  # [V]
    key = _splitmix64(seeds * _GOLDEN + steps * _STEP)  # [B]
    bits = _splitmix64(key[:, None] + index[None, :] * _GOLDEN)  # [B, V]
    return (_shr(bits, 11).to(torch.float64) + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options. temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability (0: off)
    controls: LogitControls = field(default_factory=LogitControls)  # penalties, logit_bias, min_tokens
    logprobs: int | None = None  # report each sampled token's logprob and this many top ones (None: off)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    grammar: Any = field(default=None, compare=False)  # a compiled grammar (structured outputs)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set logits whose probability is below min_p x the row's largest to -inf (transformers'
    MinPLogitsWarper; the most likely token always stays). logits # [B, V]; min_p # [B]"""
    probs = logits.softmax(dim=-1)
    floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. logits # [B, V]; top_k, top_p # [B]"""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]  # [B, 1]
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens strictly before it already cover top_p; the first always stays.
    before = probs.cumsum(dim=-1) - probs
    drop = drop | (before >= top_p[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,  # [B, V] float32
    *,
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    top_k: torch.Tensor,  # [B] int64, 0 = off
    top_p: torch.Tensor,  # [B] float32, 1 = off
    seeds: torch.Tensor,  # [B] int64
    steps: torch.Tensor,  # [B] int64, tokens generated so far by each row
    random_rows: list[int] | None = None,
    filtering: bool | None = None,
    min_p: torch.Tensor | None = None,  # [B] float32, 0 = off
) -> torch.Tensor:
    """Next token of every row. # [B] int64

    `random_rows` (the rows with temperature > 0) and `filtering` (whether any of them uses
    top-k or top-p) are what the caller knows on the host; given, nothing is read back from the
    device, otherwise they are computed here (a device sync)."""
    tokens = logits.argmax(dim=-1)  # [B], final for greedy rows
    if random_rows is None:
        random_rows = (temperature > 0).nonzero()[:, 0].tolist()
    if not random_rows:
        return tokens
    sampled = torch.tensor(random_rows, dtype=torch.int64, device=logits.device)  # [n] rows that draw at random
    # Noise, filtering and softmax only for those rows: greedy rows in the batch cost nothing here.
    scaled = logits[sampled] / temperature[sampled, None]  # [n, V]
    k, p = top_k[sampled], top_p[sampled]
    if filtering is None:
        filtering = bool(((k > 0) | (p < 1)).any())
    if filtering:
        scaled = filter_top_k_top_p(scaled, k, p)
    if min_p is not None:
        scaled = filter_min_p(scaled, min_p[sampled])
    log_probs = scaled.log_softmax(dim=-1)  # [n, V]
    exp_noise = -torch.log(uniform_noise(seeds[sampled], steps[sampled], logits.shape[-1]))  # ~ Exp(1)
    tokens[sampled] = (log_probs.double() - exp_noise.log()).argmax(dim=-1)  # argmax p / E
    return tokens

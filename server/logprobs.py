"""Log probabilities of sampled and prompt tokens (the `logprobs` and `prompt_logprobs` options).

They are taken from the model's own distribution under the row's adapter: log_softmax of the
logits before penalties, logit_bias, grammar masks, temperature and top-k/top-p/min-p (vLLM's
default, "raw" logprobs; what lm-evaluation-harness scores with). Each row's numbers come from
its own logits row alone, so they are as batch-invariant as its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability, its rank (1 = the most likely) and the `top` most likely
    tokens at its position as (token id, logprob), best first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
    """The logprob of `chosen[i]` under row i of `logits`, with row i's `tops[i]` best tokens.
    logits # [n, V] float; chosen # [n] int64 (ids < V)."""
    logprobs = logits.float().log_softmax(dim=-1)  # [n, V]
    picked = logprobs.gather(-1, chosen[:, None])  # [n, 1]
    # rank: 1 + how many tokens are strictly more likely (ties share the better rank)
    ranks = (logprobs > picked).sum(dim=-1) + 1  # [n]
    top_values, top_ids = logprobs.topk(max(tops, default=0), dim=-1)  # [n, k]
    # One read-back per tensor, not per row (prompt scoring has a row per prompt position).
    rows = zip(chosen.tolist(), picked[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), tops)
    return [TokenLogprob(token, value, rank, tuple(zip(ids[:k], values[:k])))
            for token, value, rank, ids, values, k in rows]


def next_token_targets(prompt: list[int], start: int, length: int) -> list[int]:
    """For positions start .. start+length-1 of a prompt, the prompt token each position's
    logits predict; -1 where that is past the prompt (the sampled token's position)."""
    return [prompt[p + 1] if p + 1 < len(prompt) else -1 for p in range(start, start + length)]

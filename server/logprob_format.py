"""Log probabilities in the shapes clients read: OpenAI's completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and chat (`content`: token, logprob, bytes, top_logprobs) formats,
and vLLM's `prompt_logprobs` (per prompt token: token id -> logprob, rank, decoded_token).

A token's text is its own bytes: byte-level BPE tokens (GPT-2 style) are mapped back to the bytes
they stand for, so a token holding half of a UTF-8 character reports those bytes exactly (its
`token` string shows U+FFFD, as OpenAI's does); other tokens are decoded alone. JSON has no
infinity: a logprob of -inf (a token the model cannot produce) is reported as -9999.0, as vLLM
does. No tensors and no HTTP here.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from server.logprobs import TokenLogprob

NEG_INF_LOGPROB = -9999.0


def finite(value: float) -> float:
    return value if math.isfinite(value) else NEG_INF_LOGPROB


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character a byte-level BPE token uses -> the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached (a server asks for the same tokens again and again)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_level: bool | None = None  # found on first use (tests build services with fakes)
        self._cache: dict[int, tuple[str, bytes]] = {}

    @property
    def byte_level(self) -> bool:
        if self._byte_level is None:
            try:
                probe = self.tokenizer.convert_ids_to_tokens(self.tokenizer.encode(" a", add_special_tokens=False))
                self._byte_level = bool(probe) and str(probe[0]).startswith("Ġ")
            except Exception:  # a tokenizer without token pieces: decode tokens one by one
                self._byte_level = False
        return self._byte_level

    def of(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._compute(token)
            if len(self._cache) > 1 << 17:
                self._cache.clear()
        return hit

    def _compute(self, token: int) -> tuple[str, bytes]:
        if not 0 <= token < len(self.tokenizer):  # an adapter's added token: no text in the base tokenizer
            return "", b""
        if self.byte_level and token not in getattr(self.tokenizer, "all_special_ids", ()):
            piece = str(self.tokenizer.convert_ids_to_tokens(token))
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
                return raw.decode("utf-8", errors="replace"), raw
        text = str(self.tokenizer.decode([token]))
        return text, text.encode("utf-8")

    def text(self, token: int) -> str:
        return self.of(token)[0]


def completion_logprobs(texts: TokenTexts, entries: list[tuple[int, TokenLogprob | None]], *,
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object for (token id, its logprob) entries; None (the
    first prompt token with echo) has no logprob. `offset`: the text offset of the first token."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token, lp in entries:
        text = texts.text(token)
        offsets.append(offset)
        tokens.append(text)
        offset += len(text)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(finite(lp.logprob))
        top = {texts.text(t): finite(v) for t, v in lp.top}
        top.setdefault(text, finite(lp.logprob))  # the sampled token is always listed, as vLLM does
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object (`content`: one entry per token)."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text, raw = texts.of(token)
        return {"token": text, "logprob": finite(value), "bytes": list(raw)}

    content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]
    return {"content": content, "refusal": None}


def prompt_logprobs(texts: TokenTexts, scored: list[TokenLogprob], top: int) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing precedes it), then for
    each token a dict token id -> {logprob, rank, decoded_token}: the prompt token itself and
    the `top` most likely."""
    out: list[dict[str, Any] | None] = [None]
    for lp in scored:
        entries = {str(t): {"logprob": finite(v), "rank": rank, "decoded_token": texts.text(t)}
                   for rank, (t, v) in enumerate(lp.top[:top], start=1)}
        entries.setdefault(str(lp.token_id), {"logprob": finite(lp.logprob), "rank": lp.rank,
                                              "decoded_token": texts.text(lp.token_id)})
        out.append(entries)
    return out

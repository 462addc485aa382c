"""Per-request state inside the engine core: token ids in, token ids out, token-level stops.

The core never sees text. It finishes a request on a stop token id (EOS unless `ignore_eos`,
plus `stop_token_ids`), on `max_tokens` or at the context limit; stop strings, detokenization
and everything else about text run on the service side (server/text_stream.py), which turns a
stop string into a cancel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.logprobs import TokenLogprob
from server.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class AdapterUse:
    """One adapter a request adds, and how strongly."""

    key: str  # slot key of the adapter version
    weights: Any = None  # the version's weights, resolved when the request was accepted
    weight: float = 1.0  # multiplies its contribution


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine core takes: token ids and how to sample the next ones."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    adapter: str | None = None  # slot key of the LoRA adapter version; None = the base model
    # The version's weights, resolved when the request was accepted: a queued request gets the
    # version it was accepted with even if the adapter is replaced or deleted meanwhile.
    adapter_weights: Any = None
    lora_scale: float = 1.0  # multiplies the adapter's contribution (the request's `lora_scale`)
    # Several adapters, their contributions summed with weights (instead of the three fields above).
    mix: tuple[AdapterUse, ...] = ()

    @property
    def uses(self) -> tuple[AdapterUse, ...]:
        """Every adapter the request adds (none: the base model)."""
        if self.mix:
            return self.mix
        return () if self.adapter is None else (AdapterUse(self.adapter, self.adapter_weights, self.lora_scale),)

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        return tuple(use.key for use in self.uses)

    def label(self, base_name: str, name_of: Callable[[str], str]) -> str:
        """What statistics call the request: the base model, its adapter's name (`name_of(key)`),
        or `(mix of N)` for a mix: combinations of adapters would make label values unbounded."""
        keys = self.adapter_keys
        if not keys:
            return base_name
        return name_of(keys[0]) if len(keys) == 1 else f"(mix of {len(keys)})"


@dataclass(frozen=True)
class TokenOutput:
    """One event of the core for a request: the tokens sampled since the previous event."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    time: float = 0.0  # time.monotonic() when the engine produced it (latency metrics)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (first event), when asked for
    client_error: bool = False  # the error is the request's own (its output format cannot go on): a 400


class Sequence:
    def __init__(self, request: GenerationRequest, *, eos_ids: frozenset[int], max_len: int) -> None:
        self.request = request
        self.row: int = -1
        self.slots: list[int] = []  # LoRA slots held while running, one per adapter it uses
        self.module_slot: int | None = None  # module slot held while running (modules_to_save)
        # What the sequence prefills: its prompt; after a preemption, prompt and output so far.
        self.prefill_ids: list[int] = request.prompt_ids
        self.prefilled = 0  # prefill tokens already in the cache
        self.blocks: list[int] = []  # KV block table (server/engine_blocks.py)
        self.block_hashes: list[bytes] | None = None  # prefix-cache keys of prefill_ids' full blocks
        self.hash_window = 0  # the LoRA rank window those keys were made for
        self.registered = 0  # leading blocks already offered to the prefix cache
        self.seed: int | None = None  # the sampling seed, drawn when first admitted
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else set(eos_ids))
        self.stop_ids = tuple(sorted(self._stop_ids))  # what min_tokens holds back
        self._max_len = max_len

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefill_len(self) -> int:
        return len(self.prefill_ids)

    @property
    def next_position(self) -> int:
        """Where the next decode token is written: after the prompt and every output token but
        the last sampled one (which is that token)."""
        return self.prompt_len + len(self.output_ids) - 1

    def preempt(self) -> None:
        """Lose the cache: on resuming, prefill the prompt and the output so far, then sample on."""
        self.prefill_ids = self.request.prompt_ids + self.output_ids
        self.prefilled = 0
        self.block_hashes = None
        self.row = -1

    def append(self, token: int, now: float, logprob: TokenLogprob | None = None,
               prompt_logprobs: list[TokenLogprob] | None = None) -> TokenOutput:
        """Record a sampled token; return the event carrying it (with its logprob and, on the
        first token, the prompt's, when the request asked for them)."""
        if self.request.max_tokens == 0:  # scoring a prompt (echo): its logprobs, no token
            self.finish_reason = "length"
            return self._event([], now, prompt_logprobs=prompt_logprobs)
        self.output_ids.append(token)
        if token in self._stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.request.max_tokens or self.prompt_len + len(self.output_ids) >= self._max_len:
            self.finish_reason = "length"
        return self._event([token], now, logprobs=None if logprob is None else [logprob],
                           prompt_logprobs=prompt_logprobs)

    def abort(self, reason: FinishReason = "abort", error: str | None = None, client_error: bool = False) -> TokenOutput:
        self.finish_reason = reason
        return self._event([], time.monotonic(), error=error, client_error=client_error)

    def _event(self, token_ids: list[int], now: float, **extra: Any) -> TokenOutput:
        """The event of `token_ids`; `extra`: its other TokenOutput fields (error, logprobs, ...)."""
        return TokenOutput(
            request_id=self.request_id,
            token_ids=token_ids,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            time=now,
            **extra,
        )

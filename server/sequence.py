"""Per-request generation state on the text side: output tokens, detokenization, stop conditions.

No tensors here: the engine feeds each sampled token id to `Sequence.append`, which decides
whether the request is finished and which text may be released to the client. Text that could
still turn out to be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from server.detokenize import Decoder, IncrementalDetokenizer
from server.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    adapter: str | None = None  # slot key of the LoRA adapter version; None = the base model
    # The version's weights, resolved when the request was accepted: a queued request gets the
    # version it was accepted with even if the adapter is replaced or deleted meanwhile.
    adapter_weights: Any = None


@dataclass(frozen=True)
class RequestOutput:
    """One event for a request: new text and tokens since the previous event."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: Decoder,
        *,
        eos_ids: frozenset[int],
        max_len: int,
    ) -> None:
        self.request = request
        self.row: int = -1
        self.slot: int | None = None  # LoRA slot held while running
        self.prefilled = 0  # prompt tokens already written to the cache
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already sent
        self.finish_reason: FinishReason | None = None
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else set(eos_ids))
        self._max_len = max_len
        self._longest_stop = max((len(s) for s in request.stop), default=0)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    def append(self, token: int) -> RequestOutput:
        """Record a sampled token; return the event carrying it (text may be empty while held back)."""
        self.output_ids.append(token)
        if token in self._stop_ids:
            self.finish_reason = "stop"
        else:
            self._add_text(self._detok.push(token))
        if not self.finished and (
            len(self.output_ids) >= self.request.max_tokens
            or self.prompt_len + len(self.output_ids) >= self._max_len
        ):
            self._add_text(self._detok.flush())
            if not self.finished:
                self.finish_reason = "length"
        return self._event([token])

    def abort(self, reason: FinishReason = "abort", error: str | None = None) -> RequestOutput:
        self.finish_reason = reason
        return self._event([], error=error)

    def _add_text(self, delta: str) -> None:
        if not delta or self.finished:
            return
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += delta
        if self.request.stop:
            cut = find_stop(self.text, self.request.stop, search_from)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"

    def _event(self, token_ids: list[int], error: str | None = None) -> RequestOutput:
        end = len(self.text) if self.finished else len(self.text) - held_back(self.text, self.request.stop)
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return RequestOutput(
            request_id=self.request_id,
            text=delta,
            token_ids=token_ids,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            error=error,
        )

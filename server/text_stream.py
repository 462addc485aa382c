"""The text side of one request: detokenization and stop strings, off the engine core.

The service feeds each `TokenOutput` of the core to `TextStream.feed`, on the event loop, and
gets the `RequestOutput` the client sees: the text completed by those tokens, minus anything
that could still turn out to be the start of a stop string (held back until it cannot). When a
stop string appears, the stream finishes with "stop" and the text is cut before it; the service
then cancels the core request, which may have sampled a token or two more (never sent).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.detokenize import Decoder, IncrementalDetokenizer
from server.logprobs import TokenLogprob
from server.sequence import FinishReason, TokenOutput


@dataclass(frozen=True)
class RequestOutput:
    """One event for a client: new text and tokens since the previous event."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.., when asked for
    client_error: bool = False  # the error is the request's own doing (a 400)


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


class TextStream:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.text = ""
        self.emitted = 0  # characters of self.text already sent
        self.finish_reason: FinishReason | None = None
        self.stopped_by_string = False  # the core request still runs: the service cancels it
        self.completion_tokens = 0
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._longest_stop = max((len(s) for s in stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: TokenOutput) -> RequestOutput:
        """The client's event for one core event. Not called once the text has finished: what
        the core produced after a stop string is never sent."""
        if self.finished:
            raise ValueError("the text stream has already finished")
        # A core "stop" with tokens ends on a stop token id, which has no text.
        stop_id = len(out.token_ids) - 1 if out.finish_reason == "stop" else -1
        taken: list[int] = []
        for i, token in enumerate(out.token_ids):
            if self.finished:
                break
            taken.append(token)
            if i != stop_id:
                self._add_text(self._detok.push(token))
        self.completion_tokens += len(taken)
        if not self.finished and out.finished:
            if out.finish_reason == "length":  # cut mid-character: keep what is complete
                self._add_text(self._detok.flush())
            if not self.finished:
                self.finish_reason = out.finish_reason
        return self._event(out, taken)

    def _add_text(self, delta: str) -> None:
        if not delta or self.finished:
            return
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += delta
        if self.stop:
            cut = find_stop(self.text, self.stop, search_from)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                self.stopped_by_string = True

    def _event(self, out: TokenOutput, token_ids: list[int]) -> RequestOutput:
        end = len(self.text) if self.finished else len(self.text) - held_back(self.text, self.stop)
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return RequestOutput(
            request_id=out.request_id,
            text=delta,
            token_ids=token_ids,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=self.completion_tokens,
            error=out.error,
            logprobs=None if out.logprobs is None else out.logprobs[: len(token_ids)],
            prompt_logprobs=out.prompt_logprobs,
            client_error=out.client_error,
        )

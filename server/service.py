"""Text-level generation service between the HTTP routes and the engine.

Turns prompts and chat messages into token ids, checks them against the context, submits
requests to the engine and exposes each request's events as an async iterator. It holds no
tensors and knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.catalog import AdapterCatalog, AdapterRef
from adapters.errors import AdapterNotFoundError
from server.engine import Engine
from server.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
)
from server.metrics import RequestTracker, ServerMetrics, finish_status
from server.sampling import SamplingParams
from server.sequence import GenerationRequest, RequestOutput

_counter = itertools.count()


@dataclass(frozen=True)
class GenerationOptions:
    """What a client asked for, before it is tied to a prompt."""

    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    adapter: AdapterRef | None = None


def check_text(text: str, param: str) -> None:
    """Text a client sent must be encodable as UTF-8: JSON can carry a lone surrogate ("\\ud800"),
    which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{param} contains an invalid Unicode character at position {exc.start} (a lone surrogate)", param=param
        ) from None


class CompletionService:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        catalog: AdapterCatalog,
        *,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        request_timeout: float | None = None,
        admin: Any = None,
    ) -> None:
        """`admin`: the AdminService (server/admin.py) the admin routes use; None: no admin API."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.admin = admin
        self.metrics: ServerMetrics | None = None  # set by the app (ServerMetrics.attach); None: not measured
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.request_timeout = request_timeout

    # ---- names ---------------------------------------------------------------------------
    async def check_model(self, name: str | None) -> tuple[str, AdapterRef | None]:
        """(served name, adapter version) for a request's `model` field; None or the base name =
        no adapter. Looked up on a worker thread: the catalog may re-read the store (another
        process changed it) and a cold adapter is read from disk."""
        if name is None or name == self.model_name:
            return self.model_name, None
        return name, await asyncio.to_thread(self._resolve_adapter, name)

    def _resolve_adapter(self, name: str) -> AdapterRef:
        try:
            return self.catalog.resolve(name)
        except AdapterNotFoundError:
            # No list of what is served: clients of the inference API do not learn other
            # tenants' adapter names from an error (GET /v1/models lists them where allowed).
            raise ModelNotFoundError(f"The model `{name[:200]}` does not exist.") from None

    # ---- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
                )
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        for message in messages:
            check_text(message["content"], "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions instead", param="messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # template errors (e.g. role order) are the client's to fix
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The rendered template already holds its special tokens.
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        return ids

    def build_request(self, prompt_ids: list[int], options: GenerationOptions) -> GenerationRequest:
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if options.max_tokens is None else options.max_tokens
        if room < 1 or max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if room >= 1 else "prompt",
            )
        bad_stop = [t for t in options.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids out of range: {bad_stop[:5]}", param="stop_token_ids")
        return GenerationRequest(
            request_id=f"{uuid.uuid4().hex[:16]}-{next(_counter)}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=options.sampling,
            stop=options.stop,
            stop_token_ids=options.stop_token_ids,
            ignore_eos=options.ignore_eos,
            adapter=None if options.adapter is None else options.adapter.key,
            adapter_weights=None if options.adapter is None else options.adapter.weights,
        )

    # ---- running -------------------------------------------------------------------------
    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[RequestEvents]:
        """Submit every request now, so that a full queue (429) or a shutdown (503) is raised
        before any response is sent; if one fails, those already submitted are cancelled. Returns
        each request's events; closing them (the routes do, in a `finally`) cancels what has not
        finished, whether or not it was ever read."""
        loop = asyncio.get_running_loop()
        streams: list[RequestEvents] = []
        try:
            for request in requests:
                streams.append(self._submit(request, loop))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestEvents:
        tracker = None if self.metrics is None else self.metrics.track(request, self.model_name)
        stream = RequestEvents(self.engine, request, tracker, self.request_timeout)

        def sink(event: RequestOutput) -> None:  # called on the engine thread
            if tracker is not None:  # timestamps taken here, when the engine emits the token
                tracker.on_event(event)
            try:
                loop.call_soon_threadsafe(stream.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        self.engine.submit(request, sink)
        # One timer per request (not one per token): it wakes the reader with None.
        if self.request_timeout is not None:
            stream.timer = loop.call_later(self.request_timeout, stream.queue.put_nowait, None)
        return stream


class RequestEvents:
    """The events of one submitted request, read once with `async for`. `close()` is idempotent
    and cancels the engine request unless it finished: a generator's `finally` alone would not
    run for a stream that was never started (a client gone before the body was sent)."""

    def __init__(self, engine: Engine, request: GenerationRequest, tracker: RequestTracker | None,
                 timeout: float | None) -> None:
        self.engine = engine
        self.request = request
        self.tracker = tracker
        self.timeout = timeout
        self.queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()  # None: the timeout fired
        self.timer: asyncio.TimerHandle | None = None
        self._finished = False
        self._timed_out = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self._finished:
                event = await self.queue.get()
                if event is None:
                    self._timed_out = True
                    raise RequestTimeoutError(
                        f"the request ran longer than the server's limit of {self.timeout:g} s "
                        "(--request-timeout); ask for fewer tokens"
                    )
                self._finished = event.finished
                if self._finished and self.tracker is not None:  # counted before the response ends
                    self.tracker.finish(finish_status(event.finish_reason))
                yield event
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.timer is not None:
            self.timer.cancel()
        if not self._finished:  # the client went away, the task was cancelled or the timeout fired
            self.engine.cancel(self.request.request_id)
            if self.tracker is not None:
                self.tracker.finish("timeout" if self._timed_out else "cancelled")

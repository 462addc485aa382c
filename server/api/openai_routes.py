"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from server.api.errors import error_body
from server.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    _SamplingFields,
)
from server.errors import GenerationFailedError, InvalidRequestError, LoadFailedError, NotReadyError
from server.logit_controls import LogitControls
from server.logprob_format import chat_logprobs, completion_logprobs, prompt_logprobs
from server.logprobs import TokenLogprob
from server.sampling import SamplingParams
from server.request_events import RequestEvents
from server.service import CompletionService, GenerationOptions
from server.structured import StructuredSpec, parse_spec
from server.text_stream import RequestOutput

router = APIRouter()


def get_service(request: Request) -> CompletionService:
    holder = request.app.state.holder
    service = holder.service
    if service is None and holder.error is not None:
        raise LoadFailedError(f"the model failed to load: {holder.error}")
    if service is None:
        raise NotReadyError("the model is still loading; retry when GET /ready returns 200")
    return service


def _options(body: _SamplingFields, max_tokens: int | None, *, logprobs: int | None = None,
             prompt_logprobs: int | None = None) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed, min_p=body.min_p,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            controls=LogitControls(
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
            ),
        ),
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        n=body.n,
        lora_scale=body.lora_scale,
        adapters=None if body.adapters is None else tuple((a.name, a.weight) for a in body.adapters),
        structured=_structured(body),
        bad_words=tuple(body.bad_words or ()),
    )


# structured_outputs options that pick a backend or a whitespace style: loraswap has one of each
_IGNORED_STRUCTURED = ("backend", "disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                       "whitespace_pattern")


def _structured(body: _SamplingFields) -> StructuredSpec | None:
    structured = {k: v for k, v in (body.structured_outputs or {}).items() if k not in _IGNORED_STRUCTURED}
    guided = {name: getattr(body, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")}
    return parse_spec(body.response_format, structured, guided)


def _usage(finals: list[RequestOutput], n: int) -> Usage:
    # Each prompt's tokens count once, however many samples (n) it has.
    prompt = sum(f.prompt_tokens for f in finals) // n
    completion = sum(f.completion_tokens for f in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class Collected:
    """One choice, run to its end: its text, last event, and the logprobs of its tokens and
    prompt (when asked for)."""

    text: str
    final: RequestOutput
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None


async def _collect(stream: RequestEvents) -> Collected:
    parts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    prompt: list[TokenLogprob] | None = None
    last: RequestOutput | None = None
    async for event in stream:
        parts.append(event.text)
        ids += event.token_ids
        logprobs += event.logprobs or []
        prompt = event.prompt_logprobs if event.prompt_logprobs is not None else prompt
        last = event
    assert last is not None and last.finished
    if last.finish_reason == "error":
        if last.client_error:
            raise InvalidRequestError(last.error or "the request cannot be completed")
        raise GenerationFailedError(last.error or "generation failed")
    return Collected("".join(parts), last, ids, logprobs, prompt)


async def _collect_all(http_request: Request, streams: list[RequestEvents]) -> list[Collected]:
    """Run submitted requests to completion. If one fails or the client disconnects, the others
    are cancelled (which frees their rows) rather than left generating for nobody."""
    tasks = [asyncio.ensure_future(_collect(stream)) for stream in streams]

    async def disconnected() -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(disconnected())
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise asyncio.CancelledError  # client gone
            pending.discard(watcher)
            for task in done:
                task.result()  # re-raises the first failure
        return [task.result() for task in tasks]
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        for stream in streams:  # a task cancelled before it ran never started its stream
            stream.close()


async def _merged(streams: list[RequestEvents]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Events of several requests as (choice index, event), in arrival order."""
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    async def pump(index: int, stream: RequestEvents) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:  # e.g. the request timed out: end this choice with an error
            failed = RequestOutput("", "", [], finished=True, finish_reason="error", error=str(exc))
            await queue.put((index, failed))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, event = await queue.get()
            remaining -= event.finished
            yield index, event
    finally:
        for task in tasks:  # client gone: cancelling the pumps cancels the engine requests
            task.cancel()


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def _event_stream(
    streams: list[RequestEvents],
    body: _SamplingFields,
    make_chunk: Callable[[int, RequestOutput | None], BaseModel | None],
    make_usage_chunk: Callable[[Usage], BaseModel],
) -> StreamingResponse:
    """SSE for several choices: an opening chunk per choice (if make_chunk(i, None) gives one),
    a chunk per event that make_chunk makes one of (text, logprobs or a finish), a usage chunk
    unless turned off, then [DONE]."""
    include_usage = body.stream_options.include_usage if body.stream_options else True

    async def events() -> AsyncIterator[str]:
        for i in range(len(streams)):
            opening = make_chunk(i, None)
            if opening is not None:
                yield _sse(opening)
        finals: list[RequestOutput] = []
        async for index, event in _merged(streams):
            if event.finish_reason == "error":
                kind = "invalid_request_error" if event.client_error else "internal_error"
                yield _sse(error_body(event.error or "generation failed", type_=kind))
                break
            if event.finished:
                finals.append(event)
            made = make_chunk(index, event)
            if made is not None:
                yield _sse(made)
        else:
            if include_usage:
                yield _sse(make_usage_chunk(_usage(finals, body.n)))
        yield "data: [DONE]\n\n"

    return _ClosingStream(streams, events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _ClosingStream(StreamingResponse):
    """Closes the requests' streams when the response ends in any way, including a client gone
    before the body generator ever started (its own `finally` would then never run)."""

    def __init__(self, streams: list[RequestEvents], content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.close()


def _prompt_scoring(body: CompletionRequest) -> int | None:
    """Top logprobs to compute for the prompt: for echo with logprobs, and for prompt_logprobs."""
    if body.stream and body.prompt_logprobs is not None:
        raise InvalidRequestError("prompt_logprobs are not available when streaming", param="stream")
    wanted = [n for n in (body.logprobs if body.echo else None, body.prompt_logprobs) if n is not None]
    return max(wanted) if wanted else None


def _echo_entries(prompt_ids: list[int], scored: list[TokenLogprob] | None) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's logprob entries for echo: the first token has none."""
    return [(prompt_ids[0], None), *zip(prompt_ids[1:], scored or [])]


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, http_request: Request, service: CompletionService = Depends(get_service)) -> CompletionResponse | StreamingResponse:
    raw = body.prompt
    prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens 0 scores the prompt: it needs echo", param="max_tokens")
    options = _options(body, body.max_tokens, logprobs=body.logprobs, prompt_logprobs=_prompt_scoring(body))
    gen = await service.submit_completion(body.model, prompts, options)  # type: ignore[arg-type]
    model, completion_id = gen.model, f"cmpl-{uuid.uuid4().hex}"
    texts = service.token_texts
    echoes = [""] * len(gen.streams)
    if body.echo:
        decoded = await asyncio.to_thread(lambda: [service.decode(ids) for ids in gen.prompt_ids])
        echoes = [text for text in decoded for _ in range(body.n)]

    if body.stream:
        offsets = [0] * len(echoes)  # text_offset of each choice's next token
        # With logprobs the echo waits for the first event, which carries the prompt's logprobs.
        pending_echo = [body.echo and body.logprobs is not None] * len(echoes)

        def chunk(index: int, event: RequestOutput | None) -> BaseModel | None:
            if event is None:
                if not echoes[index] or pending_echo[index]:
                    return None
                offsets[index] = len(echoes[index])
                return CompletionResponse(id=completion_id, model=model,
                                          choices=[CompletionChoice(index=index, text=echoes[index])])
            text, logprobs = event.text, None
            if body.logprobs is not None:
                entries: list[tuple[int, TokenLogprob | None]] = list(zip(event.token_ids, event.logprobs or []))
                if pending_echo[index]:
                    pending_echo[index] = False
                    text = echoes[index] + text
                    entries = _echo_entries(gen.prompt_ids[index // body.n], event.prompt_logprobs) + entries
                logprobs = completion_logprobs(texts, entries, offset=offsets[index])
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
            if not (text or event.finished or (logprobs and logprobs["tokens"])):
                return None
            finish = event.finish_reason if event.finished else None
            return CompletionResponse(id=completion_id, model=model, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)])

        def usage_chunk(usage: Usage) -> BaseModel:
            return CompletionResponse(id=completion_id, model=model, choices=[], usage=usage)

        return _event_stream(gen.streams, body, chunk, usage_chunk)

    results = await _collect_all(http_request, gen.streams)
    choices = []
    for i, result in enumerate(results):
        prompt_ids = gen.prompt_ids[i // body.n]
        logprobs = None
        if body.logprobs is not None:
            entries: list[tuple[int, TokenLogprob | None]] = list(zip(result.token_ids, result.logprobs))
            if body.echo:
                entries = _echo_entries(prompt_ids, result.prompt_logprobs) + entries
            logprobs = completion_logprobs(texts, entries)
        scored = None
        if body.prompt_logprobs is not None:
            scored = prompt_logprobs(texts, result.prompt_logprobs or [], body.prompt_logprobs)
        choices.append(CompletionChoice(index=i, text=echoes[i] + result.text, finish_reason=result.final.finish_reason,
                                        logprobs=logprobs, prompt_logprobs=scored))
    return CompletionResponse(id=completion_id, model=model, choices=choices, usage=_usage([r.final for r in results], body.n))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, http_request: Request, service: CompletionService = Depends(get_service)) -> ChatCompletionResponse | StreamingResponse:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError("prompt_logprobs are not available when streaming", param="stream")
    options = _options(body, body.max_completion_tokens or body.max_tokens, prompt_logprobs=body.prompt_logprobs,
                       logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    gen = await service.submit_chat(body.model, messages, options)
    model, completion_id = gen.model, f"chatcmpl-{uuid.uuid4().hex}"
    texts = service.token_texts

    if body.stream:
        def chunk(index: int, event: RequestOutput | None) -> BaseModel | None:
            logprobs = None
            if event is None:  # OpenAI opens every choice with the role
                delta, finish = Delta(role="assistant", content=""), None
            else:
                delta = Delta(content=event.text or None)
                finish = event.finish_reason if event.finished else None
                if body.logprobs and event.logprobs:
                    logprobs = chat_logprobs(texts, event.logprobs)
                if not (event.text or event.finished or logprobs):
                    return None
            return ChatCompletionChunk(id=completion_id, model=model, choices=[
                ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])

        def usage_chunk(usage: Usage) -> BaseModel:
            return ChatCompletionChunk(id=completion_id, model=model, choices=[], usage=usage)

        return _event_stream(gen.streams, body, chunk, usage_chunk)

    results = await _collect_all(http_request, gen.streams)
    choices = [
        ChatChoice(index=i, message=ChatMessageOut(content=r.text), finish_reason=r.final.finish_reason,
                   logprobs=chat_logprobs(texts, r.logprobs) if body.logprobs else None)
        for i, r in enumerate(results)
    ]
    scored = None
    if body.prompt_logprobs is not None:
        scored = prompt_logprobs(texts, results[0].prompt_logprobs or [], body.prompt_logprobs)
    return ChatCompletionResponse(id=completion_id, model=model, choices=choices,
                                  usage=_usage([r.final for r in results], body.n), prompt_logprobs=scored)


@router.get("/v1/models")
async def list_models(service: CompletionService = Depends(get_service)) -> ModelList:
    """Names only: where an adapter came from (a server path, a hub id) is the admin API's."""
    base = ModelCard(id=service.model_name, max_model_len=service.max_model_len)
    served = await asyncio.to_thread(service.catalog.all)  # may re-read the store: off the event loop
    adapters = [ModelCard(id=a.name, parent=service.model_name, max_model_len=service.max_model_len,
                          features=a.features()) for a in served]
    return ModelList(data=[base, *adapters])

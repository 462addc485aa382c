"""Text-level generation service between the HTTP routes and the engine core.

A route makes one call here (`submit_completion`, `submit_chat`) and reads the events back: the
service resolves the `model` field, turns prompts and chat messages into token ids, checks them
against the context, fans a request out into one engine request per choice, submits them, and
returns each choice's events as an async iterator (server/request_events.py). The core's token
events come back on the event loop, where they are detokenized, stop strings applied (a stop
string becomes a cancel of the core request) and per-token metrics recorded, so none of that runs
on the engine thread. It also compiles output formats (server/structured.py). No tensors here
and no HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from adapters.catalog import AdapterCatalog, AdapterRef
from adapters.errors import AdapterNotFoundError
from server.adapter_mix import Mix, check_mix, check_scale, is_mix, mix_label, parse_mix
from server.engine_client import EngineClient
from server.logprob_format import TokenTexts
from server.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
from server.metrics import ServerMetrics
from server.request_events import RequestEvents
from server.sampling import SamplingParams
from server.sequence import AdapterUse, GenerationRequest, TokenOutput
from server.structured import StructuredOutputs, StructuredSpec
from server.text_stream import TextStream

_counter = itertools.count()
MAX_CHOICES = 256  # prompts x n in one request


@dataclass(frozen=True)
class GenerationOptions:
    """What a client asked for, before it is tied to a prompt."""

    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # choices per prompt; sample i of a seeded request uses seed + i
    lora_scale: float = 1.0  # multiplies the adapter's contribution
    adapters: Mix | None = None  # the `adapters` field: a weighted mix (then `model` names the base)
    structured: StructuredSpec | None = None  # the output format (JSON schema, regex, choice, grammar)
    bad_words: tuple[str, ...] = ()  # never generated (tokenized here, as the served tokenizer splits them)


Uses = tuple[tuple[AdapterRef, float], ...]  # the adapter versions a request adds, with weights


@dataclass(frozen=True)
class Generation:
    """A submitted request: the name it was served under and one event stream per choice
    (prompt-major: choice i is prompt i // n, sample i % n)."""

    model: str
    streams: list[RequestEvents]
    prompt_ids: list[list[int]]


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
        engine: EngineClient,
        tokenizer: Any,
        catalog: AdapterCatalog,
        *,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        request_timeout: float | None = None,
        admin: Any = None,
        metrics: ServerMetrics | None = None,
        max_loras: int | None = None,
    ) -> None:
        """`admin`: the AdminService (server/admin.py) the admin routes use; None: no admin API.
        `metrics`: where request timelines are recorded; None: not measured. `max_loras`: the
        slots, which bound how many adapters one request may mix."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.admin = admin
        self.metrics = metrics
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.request_timeout = request_timeout
        self.max_loras = max_loras
        self.token_texts = TokenTexts(tokenizer)  # each token's own text and bytes (logprobs)
        self.structured = StructuredOutputs(tokenizer, vocab_size)  # compiles output formats, cached

    def stats(self) -> dict[str, object]:
        """The engine's counters and the adapter CPU cache's (for /ready and /metrics)."""
        cache = {"hits": self.catalog.cache_hits, "misses": self.catalog.cache_misses}
        return {**self.engine.stats(), "adapter_cpu_cache": cache}

    # ---- the two entry points of the routes ------------------------------------------------
    async def submit_completion(self, model: str | None, prompts: Sequence[str | Sequence[int]],
                                options: GenerationOptions) -> Generation:
        """Every prompt x n choices of a /v1/completions request, submitted."""
        if not prompts:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        self._check_choices(len(prompts), options.n)
        served, uses = await self.check_model(model, options.adapters)
        vocab = self.vocab_of(uses)
        # Tokenizing a long prompt is CPU work: off the event loop, which keeps serving meanwhile.
        ids = await asyncio.to_thread(lambda: [self.encode_prompt(p, vocab) for p in prompts])
        return self._submit_all(served, ids, await self._with_grammar(options), uses)

    async def submit_chat(self, model: str | None, messages: list[dict[str, str]],
                          options: GenerationOptions) -> Generation:
        """The n choices of a /v1/chat/completions request, submitted."""
        self._check_choices(1, options.n)
        served, uses = await self.check_model(model, options.adapters)
        ids = await asyncio.to_thread(self.encode_chat, messages)
        return self._submit_all(served, [ids], await self._with_grammar(options), uses)

    async def _with_grammar(self, options: GenerationOptions) -> GenerationOptions:
        """The options with their output format compiled (cached), when they ask for one."""
        spec = options.structured
        if spec is None:
            return options
        if options.ignore_eos and not options.stop_token_ids:
            raise InvalidRequestError("an output format ends on a stop token: with ignore_eos, name one in "
                                      "stop_token_ids", param="ignore_eos")
        grammar = await self.structured.compile(spec)
        return replace(options, sampling=replace(options.sampling, grammar=grammar))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    # ---- names ---------------------------------------------------------------------------
    async def check_model(self, name: str | None, adapters: Mix | None = None) -> tuple[str, Uses]:
        """(served name, adapter versions with weights) for a request's `model` field and
        `adapters` mix; None or the base name = no adapter. Looked up on a worker thread: the
        catalog may re-read the store (another process changed it) and a cold adapter is read
        from disk."""
        if adapters is not None:
            if name is not None and name != self.model_name:
                raise InvalidRequestError(f"with `adapters`, `model` names the base model ({self.model_name!r}) or is "
                                          "left out", param="model")
            terms, param, served = check_mix(adapters, "adapters"), "adapters", mix_label(adapters)
        elif name is None or name == self.model_name:
            return self.model_name, ()
        elif is_mix(name):
            terms, param, served = parse_mix(name), "model", name
        else:
            return name, ((await asyncio.to_thread(self._resolve_adapter, name), 1.0),)
        if any(term == self.model_name for term, _ in terms):
            raise InvalidRequestError("a mix lists adapters; the base model is what they are added to", param=param)
        if self.max_loras is not None and len(terms) > self.max_loras:
            raise InvalidRequestError(f"the mix needs {len(terms)} adapters in slots at once; this server has "
                                      f"{self.max_loras} (--max-loras)", param=param)
        refs = await asyncio.to_thread(lambda: [self._resolve_adapter(term) for term, _ in terms])
        self._check_room(refs, param)
        dora = [ref.name for ref in refs if ref.weights.uses_dora]
        if dora and len(terms) > 1:
            raise InvalidRequestError(f"{dora[0]!r} is a DoRA adapter, which cannot be mixed: its norm is taken over "
                                      "its own weights alone", param=param)
        whole = [ref.name for ref in refs if ref.weights.full is not None]
        if whole and len(terms) > 1:
            raise InvalidRequestError(f"{whole[0]!r} saved its own embedding or head (modules_to_save), which a mix "
                                      "cannot combine", param=param)
        return served, tuple(zip(refs, (weight for _, weight in terms)))

    def _check_room(self, refs: list[AdapterRef], param: str) -> None:
        """A mix the unpinned slots can never hold together is the client's to change (as of the
        engine's last step; the engine refuses it too should pins change meanwhile)."""
        slots = self.engine.stats().get("slots")
        pinned = set(slots.get("pinned", ())) if isinstance(slots, dict) else set()
        if self.max_loras is None or not pinned:
            return
        room = self.max_loras - len(pinned) + sum(ref.key in pinned for ref in refs)
        if len(refs) > room:
            raise InvalidRequestError(f"the mix needs {len(refs)} slots at once; {len(pinned)} of the {self.max_loras} "
                                      f"slots are pinned by other adapters, leaving {room}", param=param)

    def _resolve_adapter(self, name: str) -> AdapterRef:
        try:
            return self.catalog.resolve(name)
        except AdapterNotFoundError:
            # No list of what is served: clients of the inference API do not learn other
            # tenants' adapter names from an error (GET /v1/models lists them where allowed).
            raise ModelNotFoundError(f"The model `{name[:200]}` does not exist.") from None

    @staticmethod
    def _check_choices(prompts: int, n: int) -> None:
        if prompts * n > MAX_CHOICES:
            raise InvalidRequestError(f"{prompts} prompts x n={n} is more than {MAX_CHOICES} completions",
                                      param="prompt")

    # ---- prompts -------------------------------------------------------------------------
    def vocab_of(self, uses: Uses) -> int:
        """Token ids a request may use: the base vocabulary, or its adapter's when that adds tokens."""
        return max([self.vocab_size, *(ref.weights.vocab or 0 for ref, _ in uses)])

    def encode_prompt(self, prompt: str | Sequence[int], vocab: int | None = None) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            # An empty string is an empty prompt, even where the tokenizer would add a BOS token.
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True)) if prompt else []
        else:
            ids = [int(t) for t in prompt]
            limit = vocab or self.vocab_size
            bad = [t for t in ids if not 0 <= t < limit]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be in [0, {limit}); got {bad[:5]}", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, add_special_tokens: bool = False) -> list[int]:
        for message in messages:
            check_text(message["content"], "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions instead", param="messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        except Exception as exc:  # template errors (e.g. role order) are the client's to fix
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The rendered template already holds its special tokens.
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        return ids

    def build_request(self, prompt_ids: list[int], options: GenerationOptions, uses: Uses = ()) -> GenerationRequest:
        check_scale(uses, options.lora_scale)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if options.max_tokens is None else options.max_tokens
        if room < 1 or max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if room >= 1 else "prompt",
            )
        return GenerationRequest(
            request_id=f"{uuid.uuid4().hex[:16]}-{next(_counter)}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=options.sampling,
            stop_token_ids=options.stop_token_ids,
            ignore_eos=options.ignore_eos,
            mix=tuple(AdapterUse(ref.key, ref.weights, weight * options.lora_scale) for ref, weight in uses),
        )

    def fan_out(self, prompts: list[list[int]], options: GenerationOptions, uses: Uses = ()) -> list[GenerationRequest]:
        """One engine request per (prompt, sample); sample i of a seeded request uses seed + i.
        Every request is checked before any is submitted."""
        options = self._checked(options, self.vocab_of(uses))
        requests = []
        for ids in prompts:
            for i in range(options.n):
                sampling = options.sampling
                if sampling.seed is not None and i:
                    sampling = replace(sampling, seed=sampling.seed + i)
                requests.append(self.build_request(ids, replace(options, sampling=sampling), uses))
        return requests

    def _checked(self, options: GenerationOptions, vocab: int) -> GenerationOptions:
        """The options with what is the same for every choice checked once: stop token ids in
        the vocabulary (`vocab`: the adapter's, when it adds tokens), stop strings encodable,
        top_k past the vocabulary clamped (it keeps all)."""
        bias = [t for t, _ in options.sampling.controls.logit_bias if not 0 <= t < vocab]
        if bias:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab}); got {bias[:5]}", param="logit_bias")
        if options.max_tokens is not None and options.sampling.controls.min_tokens > options.max_tokens:
            raise InvalidRequestError("min_tokens is larger than max_tokens", param="min_tokens")
        bad_stop = [t for t in options.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids out of range: {bad_stop[:5]}", param="stop_token_ids")
        for stop in options.stop:
            check_text(stop, "stop")
        if options.bad_words:
            controls = replace(options.sampling.controls, bad_words=self.bad_word_ids(options.bad_words))
            options = replace(options, sampling=replace(options.sampling, controls=controls))
        if options.sampling.top_k <= vocab:
            return options
        return replace(options, sampling=replace(options.sampling, top_k=vocab))

    def bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each word's tokens as it starts the text and after a space (vLLM's rule), deduplicated."""
        found: dict[tuple[int, ...], None] = {}
        for word in words:
            check_text(word, "bad_words")
            for text in (word, " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    found[ids] = None
        return tuple(found)

    # ---- running -------------------------------------------------------------------------
    def _submit_all(self, served: str, prompts: list[list[int]], options: GenerationOptions,
                    uses: Uses) -> Generation:
        """Submit every choice now, so that a full queue (429) or a shutdown (503) is raised
        before any response is sent; if one fails, those already submitted are cancelled.
        Closing a stream (the routes do, in a `finally`) cancels what has not finished, whether
        or not it was ever read."""
        requests = self.fan_out(prompts, options, uses)
        loop = asyncio.get_running_loop()
        streams: list[RequestEvents] = []
        try:
            for request in requests:
                streams.append(self._submit(request, options.stop, loop))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return Generation(served, streams, prompts)

    def _submit(self, request: GenerationRequest, stop: tuple[str, ...],
                loop: asyncio.AbstractEventLoop) -> RequestEvents:
        tracker = None if self.metrics is None else self.metrics.track(request, self.model_name)
        stream = RequestEvents(self.engine, request, TextStream(self.tokenizer, request.prompt_ids, stop),
                               tracker, self.request_timeout)

        def sink(event: TokenOutput) -> None:  # on the engine thread: hand over, nothing more
            try:
                loop.call_soon_threadsafe(stream.deliver, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        self.engine.submit(request, sink)
        # One timer per request (not one per token): it wakes the reader with None.
        if self.request_timeout is not None:
            stream.timer = loop.call_later(self.request_timeout, stream.queue.put_nowait, None)
        return stream

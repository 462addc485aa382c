"""OpenAI-compatible request and response bodies (the subset loraswap serves)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.adapter_mix import MAX_MIX, MAX_WEIGHT
from server.logprobs import MAX_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_LORA_SCALE = MAX_WEIGHT  # |lora_scale|: far past any useful strength, well inside float16
INT64_MAX = 2**63 - 1
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256


class StreamOptions(BaseModel):
    include_usage: bool = True


class AdapterWeight(BaseModel):
    """One adapter of a mix (the `adapters` extension field)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(default=1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX, description="0 or -1: off (vLLM extension)")
    seed: int | None = Field(default=None, ge=0, lt=2**62)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=1 << 18)  # up to a whole vocabulary
    n: int = Field(default=1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    lora_scale: float = Field(
        default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False,
        description="multiplies the adapter's contribution (loraswap extension; 0: the base model's output)",
    )
    adapters: list[AdapterWeight] | None = Field(
        default=None, min_length=1, max_length=MAX_MIX,
        description="a weighted mix of adapters (loraswap extension; `model` then names the base model)",
    )
    # OpenAI's penalties and logit_bias; vLLM's repetition_penalty, min_tokens and min_p.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0, allow_inf_nan=False)
    min_tokens: int = Field(default=0, ge=0, le=1 << 20)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)  # vLLM's
    # Output formats: OpenAI's response_format; vLLM's structured_outputs and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: the logprobs of every prompt token after the first, with this many top ones
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value: list[str] | None) -> list[str] | None:
        if any(not word.strip() or len(word) > MAX_BAD_WORD_CHARS for word in value or ()):
            raise ValueError(f"bad words are 1 to {MAX_BAD_WORD_CHARS} characters, not only spaces")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit()) or len(token) > 10:
                raise ValueError(f"logit_bias keys are token ids, got {token[:20]!r}")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias values are from -100 to 100, got {bias!r}")
        return value


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0, description="0 with echo: score the prompt only")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top logprobs per token")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # tokens, token_logprobs, top_logprobs, text_offset
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # content: [{token, logprob, bytes, top_logprobs}]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "loraswap"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # an adapter's: dora, modules_to_save, trainable_tokens, scalable, mixable (loraswap extension)
    features: dict[str, bool | int | list[str]] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt` (add_special_tokens defaults to true) or chat `messages`
    (rendered with the chat template; add_special_tokens defaults to false)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str

"""POST /tokenize and POST /detokenize (vLLM's routes): the served tokenizer and chat template,
as the completion routes apply them, for clients that count or score tokens themselves
(lm-evaluation-harness asks /tokenize). No tensors and no HTTP here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.errors import InvalidRequestError
from server.service import CompletionService, check_text


@dataclass(frozen=True)
class Tokenized:
    tokens: list[int]
    token_strs: list[str] | None


async def tokenize_prompt(service: CompletionService, model: str | None, prompt: str, *, add_special_tokens: bool,
                          return_token_strs: bool) -> Tokenized:
    await service.check_model(model)  # an unknown model is a 404, as on the completion routes
    check_text(prompt, "prompt")

    def encode() -> list[int]:
        return list(service.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))

    return _with_strs(service, await asyncio.to_thread(encode), return_token_strs)


async def tokenize_chat(service: CompletionService, model: str | None, messages: list[dict[str, str]], *,
                        add_generation_prompt: bool, continue_final_message: bool, add_special_tokens: bool,
                        return_token_strs: bool) -> Tokenized:
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be true",
                                  param="continue_final_message")
    await service.check_model(model)
    ids = await asyncio.to_thread(lambda: service.encode_chat(
        messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
        add_special_tokens=add_special_tokens))
    return _with_strs(service, ids, return_token_strs)


async def detokenize(service: CompletionService, model: str | None, tokens: list[int]) -> str:
    """The text of `tokens`: ids of the model's vocabulary (an adapter's added ids included when
    `model` names it; they have no text in the base tokenizer)."""
    _, uses = await service.check_model(model)
    vocab = service.vocab_of(uses)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
    known = len(service.tokenizer)
    return await asyncio.to_thread(lambda: str(service.tokenizer.decode([t for t in tokens if t < known])))


def _with_strs(service: CompletionService, ids: list[int], return_token_strs: bool) -> Tokenized:
    strs = [str(s) for s in service.tokenizer.convert_ids_to_tokens(ids)] if return_token_strs else None
    return Tokenized(tokens=ids, token_strs=strs)


def tokenizer_info(service: CompletionService) -> dict[str, object]:
    """vLLM's GET /tokenizer_info: the tokenizer's class, special tokens, chat template and the
    served context length."""
    tok = service.tokenizer

    def special(name: str) -> str | None:
        value = getattr(tok, name, None)
        return None if value is None else str(value)

    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": special("eos_token"), "bos_token": special("bos_token"),
        "pad_token": special("pad_token"), "unk_token": special("unk_token"),
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": service.max_model_len,
        "vocab_size": service.vocab_size,
    }

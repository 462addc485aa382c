"""POST /tokenize, POST /detokenize and GET /tokenizer_info, with vLLM's request and response shapes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.openai_routes import get_service
from server.api.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.errors import InvalidRequestError
from server.service import CompletionService
from server.tokenization import detokenize, tokenize_chat, tokenize_prompt, tokenizer_info

router = APIRouter()


@router.post("/tokenize")
async def tokenize_route(body: TokenizeRequest, service: CompletionService = Depends(get_service)) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give either `prompt` or `messages`", param="prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        out = await tokenize_chat(service, body.model, messages, add_generation_prompt=body.add_generation_prompt,
                                  continue_final_message=body.continue_final_message,
                                  add_special_tokens=bool(body.add_special_tokens),
                                  return_token_strs=body.return_token_strs)
    else:
        assert body.prompt is not None
        special = True if body.add_special_tokens is None else body.add_special_tokens
        out = await tokenize_prompt(service, body.model, body.prompt, add_special_tokens=special,
                                    return_token_strs=body.return_token_strs)
    return TokenizeResponse(count=len(out.tokens), max_model_len=service.max_model_len, tokens=out.tokens,
                            token_strs=out.token_strs)


@router.post("/detokenize")
async def detokenize_route(body: DetokenizeRequest, service: CompletionService = Depends(get_service)) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=await detokenize(service, body.model, body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info_route(service: CompletionService = Depends(get_service)) -> dict[str, object]:
    """The served tokenizer's special tokens, chat template and limits (what lm-evaluation-harness's
    remote tokenizer reads)."""
    return tokenizer_info(service)

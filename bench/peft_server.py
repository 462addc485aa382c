"""The baseline: the OpenAI-compatible server a user would write on transformers + PEFT.

It follows PEFT's guide for several adapters on one base model: the base model is loaded once
(float32), every adapter is added with `load_adapter(path, adapter_name=name)`, and a request for
adapter X runs `set_adapter(X)` then `model.generate` (greedy); a request naming the base model
runs inside `with model.disable_adapter():`. Requests are served one at a time, in arrival order,
by a single worker thread (switching the active adapter is global state of the model, so two
requests cannot share a `generate` call). The event loop never runs the model.

Routes: `POST /v1/chat/completions` (non-streaming, and streaming as server-sent events in
OpenAI's chunk format), `GET /v1/models`, `GET /health`, `GET /ready`.
Honoured request fields: `model`, `messages`, `max_tokens` / `max_completion_tokens`,
`ignore_eos` (then `min_new_tokens = max_tokens`), `stream`, `stream_options.include_usage`.
Decoding is always greedy (temperature and other sampling fields are accepted and ignored).

Streaming is real token by token: a streamer attached to `generate` hands every new token to the
response, which detokenizes incrementally, so the time to first token is measured as for the
other servers (it includes the wait behind the requests ahead in the queue). `usage` is in the
non-streaming answer and, with `stream_options.include_usage`, in the last streamed chunk.

    .venv/bin/python bench/peft_server.py --port 8001 --lora-modules ad0=.bench-cache/adapters/ad0 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("peft_server")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_TOKENS = 256


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


@dataclass
class Job:
    """One request for the worker; `events` receives ("token", id), then ("end", None) or ("error", str)."""

    adapter: str | None  # None: the base model
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class JobStreamer(BaseStreamer):
    """Passes each generated token to the job (the first `put` is the prompt and is skipped)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.job.emit("token", int(token))

    def end(self) -> None:
        pass


class Cancelled(StoppingCriteria):
    """Stops `generate` when the client went away."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool)


class PeftBackend:
    """The model, its adapters and the single worker thread that runs every request in turn."""

    def __init__(self, model_path: Path, adapters: dict[str, Path], served_name: str) -> None:
        start = time.monotonic()
        self.served_name = served_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.pad_id is None or self.pad_id == self.tokenizer.unk_token_id:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.adapters = list(adapters)
        if adapters:
            from peft import PeftModel

            names = iter(adapters.items())
            first, first_path = next(names)
            model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first)
            for name, path in names:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="peft-worker", daemon=True)
        self.worker.start()
        log.info("loaded %s with %d adapters in %.1f s", model_path, len(adapters), time.monotonic() - start)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except Exception as exc:  # reported to that request; the server keeps serving
                log.exception("generation failed")
                job.emit("error", f"{type(exc).__name__}: {exc}")
            else:
                job.emit("end", None)

    @torch.inference_mode()
    def _generate(self, job: Job) -> None:
        kwargs: dict[str, Any] = {
            "input_ids": job.input_ids, "attention_mask": job.attention_mask, "max_new_tokens": job.max_tokens,
            "do_sample": False, "pad_token_id": self.pad_id, "streamer": JobStreamer(job),
            "stopping_criteria": StoppingCriteriaList([Cancelled(job)]),
        }
        if job.ignore_eos:
            kwargs["min_new_tokens"] = job.max_tokens
        if job.adapter is None:
            if self.adapters:
                with self.model.disable_adapter():
                    self.model.generate(**kwargs)
            else:
                self.model.generate(**kwargs)
        else:
            self.model.set_adapter(job.adapter)
            self.model.generate(**kwargs)

    def submit(self, adapter: str | None, messages: list[dict[str, str]], max_tokens: int, ignore_eos: bool) -> Job:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        job = Job(adapter=adapter, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                  max_tokens=max_tokens, ignore_eos=ignore_eos, loop=asyncio.get_running_loop())
        self.jobs.put(job)
        return job


class Detokenizer:
    """Incremental text of a growing token list; never emits a half UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def create_app(backend: PeftBackend) -> FastAPI:
    app = FastAPI(title="transformers + PEFT baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return {"status": "ready", "adapters": backend.adapters, "queued": backend.jobs.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": backend.served_name, "object": "model", "created": now, "owned_by": "peft", "parent": None}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": "peft", "parent": backend.served_name}
                 for name in backend.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "the body is not JSON")
        name = body.get("model")
        if name == backend.served_name:
            adapter = None
        elif name in backend.adapters:
            adapter = name
        else:
            return error(404, f"the model {name!r} does not exist", "NotFoundError", "model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "messages must be a non-empty list")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, "max_tokens must be a positive integer")
        ignore_eos = bool(body.get("ignore_eos", False))
        job = backend.submit(adapter, messages, max_tokens, ignore_eos)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = int(job.input_ids.shape[1])

        def usage(completion: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def finish_reason(ids: list[int]) -> str:  # with ignore_eos, EOS is suppressed: always "length"
            return "stop" if ids and ids[-1] == backend.eos_id else "length"

        if not body.get("stream"):
            detok = Detokenizer(backend.tokenizer)
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "token":
                        detok.add(value)
                    elif kind == "error":
                        return error(500, value, "server_error")
                    else:
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            text = backend.tokenizer.decode(detok.ids, skip_special_tokens=True)
            return {
                "id": request_id, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(detok.ids)}],
                "usage": usage(len(detok.ids)),
            }

        stream_options = body.get("stream_options") or {}
        include_usage = bool(stream_options.get("include_usage", False))

        def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> Any:
            detok = Detokenizer(backend.tokenizer)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await job.events.get()
                    if kind == "token":
                        delta = detok.add(value)
                        if delta:
                            yield chunk({"content": delta})
                    elif kind == "error":
                        failure = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(failure)}\n\n"
                        return
                    else:
                        break
                yield chunk({}, finish_reason(detok.ids))
                if include_usage:
                    payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                               "model": name, "choices": [], "usage": usage(len(detok.ids))}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): a queued or running job stops
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def parse_lora_modules(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules takes NAME=PATH, got {item!r}")
        out[name] = Path(path).expanduser()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: the embedded SmolLM2)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from bench.common import model_dir

        model_path, default_name = model_dir(), EMBEDDED_NAME
    else:
        model_path, default_name = args.model, args.model.name
    backend = PeftBackend(model_path, parse_lora_modules(args.lora_modules), args.served_model_name or default_name)
    uvicorn.run(create_app(backend), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()

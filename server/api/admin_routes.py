"""Admin API: upload, replace (hotswap), inspect, pin, unload and delete adapters; the
vLLM-compatible /v1/load_lora_adapter and /v1/unload_lora_adapter. Every route needs the admin
token (or a loopback client when none is set); blocking work runs on worker threads."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from adapters.registry import check_name
from adapters.store import CONFIG_FILE, WEIGHTS_FILE
from server.admin import AdminService
from server.api.auth import require_admin
from server.api.openai_routes import get_service
from server.errors import InvalidRequestError, PayloadTooLargeError
from server.service import CompletionService

router = APIRouter(dependencies=[Depends(require_admin)])

MAX_CONFIG_BYTES = 1 << 20
MULTIPART_SLACK_BYTES = 1 << 20  # the config, boundaries and headers around the weights


class PathOrHub(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = None  # checked by server/admin.py allowed_path
    hub_id: str | None = Field(default=None, max_length=256)
    revision: str | None = Field(default=None, max_length=256)


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: bool = False


class VllmLoad(BaseModel):
    lora_name: str
    lora_path: str


class VllmUnload(BaseModel):
    lora_name: str


def get_admin(service: CompletionService = Depends(get_service)) -> AdminService:
    admin: AdminService = service.admin
    return admin


def limited(request: Request, limit: int) -> Request:
    """The same request, whose body stops with a 413 once more than `limit` bytes have arrived:
    a chunked upload (no Content-Length) is never parsed or spooled past the limit."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLargeError(f"the upload is larger than the limit of {limit / 1e6:g} MB")
        return message

    return Request(request.scope, receive)


async def _upload(name: str, request: Request, admin: AdminService) -> dict[str, Any]:
    limit = admin.max_upload_bytes + MULTIPART_SLACK_BYTES
    length = request.headers.get("content-length") or "0"
    if not length.isdigit() or int(length) > limit:
        raise PayloadTooLargeError(f"the upload is {length[:20]} bytes; the limit is {admin.max_upload_bytes / 1e6:g} MB")
    async with limited(request, limit).form(max_files=4, max_fields=8) as form:
        files: dict[str, UploadFile] = {}
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            # A part is matched by its field name or its file name; two parts that both claim one
            # of the two adapter files are refused rather than one being silently ignored.
            for key in {field, value.filename or field}:
                if key in (CONFIG_FILE, WEIGHTS_FILE) and key in files and files[key] is not value:
                    raise InvalidRequestError(f"the multipart upload has {key} twice", param=key)
                files.setdefault(key, value)
        if any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in files):
            raise InvalidRequestError("pickle files are refused; upload adapter_model.safetensors", param=WEIGHTS_FILE)
        missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in files]
        if missing:
            raise InvalidRequestError(f"the multipart upload lacks {' and '.join(missing)}", param=missing[0])
        config = await files[CONFIG_FILE].read(MAX_CONFIG_BYTES + 1)
        if len(config) > MAX_CONFIG_BYTES:
            raise InvalidRequestError(f"{CONFIG_FILE} is larger than 1 MiB", param=CONFIG_FILE)
        return await asyncio.to_thread(admin.put_upload, name, config, files[WEIGHTS_FILE].file)


@router.put("/admin/adapters/{name}")
async def put_adapter(name: str, request: Request, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    """Create `name`, or replace it with a new version (running requests finish on the old one)."""
    check_name(name)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _upload(name, request, admin)
    if not content_type.startswith("application/json"):
        raise InvalidRequestError(
            "send multipart/form-data with adapter_config.json and adapter_model.safetensors, "
            'or JSON {"path": ...} or {"hub_id": ..., "revision": ...}'
        )
    try:
        body = PathOrHub.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid body: {exc.errors()[0]['msg']}") from None
    if (body.path is None) == (body.hub_id is None):
        raise InvalidRequestError('give exactly one of "path" and "hub_id"')
    if body.path is not None:
        return await asyncio.to_thread(admin.put_path, name, body.path)
    assert body.hub_id is not None
    return await asyncio.to_thread(admin.put_hub, name, body.hub_id, body.revision)


@router.get("/admin/model")
async def model_info(admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    """The base model: name, dtype, device, quantization, compile, memory footprint in bytes."""
    return admin.model_info


@router.get("/admin/adapters")
async def list_adapters(admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    return {"adapters": await asyncio.to_thread(admin.list)}


@router.get("/admin/adapters/{name}")
async def get_adapter(name: str, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    return await asyncio.to_thread(admin.status, name)


@router.delete("/admin/adapters/{name}")
async def delete_adapter(name: str, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    return await asyncio.to_thread(admin.delete, name)


@router.post("/admin/adapters/{name}/load")
async def load_adapter(name: str, body: LoadBody | None = None, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    pin = body.pin if body is not None else False
    return await asyncio.to_thread(lambda: admin.load(name, pin=pin))


@router.post("/admin/adapters/{name}/unload")
async def unload_adapter(name: str, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    return await asyncio.to_thread(admin.unload, name)


@router.post("/v1/load_lora_adapter")
async def vllm_load(body: VllmLoad, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    """vLLM's route: a server path (inside --adapter-roots) under a name."""
    check_name(body.lora_name)
    return await asyncio.to_thread(admin.put_path, body.lora_name, body.lora_path)


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(body: VllmUnload, admin: AdminService = Depends(get_admin)) -> dict[str, Any]:
    """vLLM's route: the adapter is no longer served (deleted here)."""
    return await asyncio.to_thread(admin.delete, body.lora_name)


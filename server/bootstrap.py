"""Build a ready-to-serve CompletionService from Settings: resolve, load, allocate, warm up."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from adapters.peft_format import read_adapter_dir
from adapters.registry import AdapterInfo, AdapterRegistry, check_name
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights, validate
from config.settings import Settings
from server.engine import Engine
from server.errors import UnsupportedModelError
from server.model_config import load_model_config
from server.model_source import EMBEDDED_NAME, resolve_model
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.service import CompletionService
from server.weights import build_model

log = logging.getLogger("loraswap.bootstrap")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was requested but no CUDA device is visible")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # bf16 matmul is slow on most CPUs; float32 there, bfloat16 on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def eos_token_ids(folder: Path, config_eos: tuple[int, ...], tokenizer: object) -> frozenset[int]:
    ids = set(config_eos)
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return frozenset(ids)


def served_name(settings: Settings, folder: Path) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if not settings.model:
        return EMBEDDED_NAME
    return settings.model.rstrip("/") if not Path(settings.model).expanduser().is_dir() else folder.name


def build_service(settings: Settings) -> CompletionService:
    from transformers import AutoTokenizer

    start = time.monotonic()
    folder = resolve_model(settings.model)
    cfg = load_model_config(folder)
    if settings.max_model_len > cfg.max_position_embeddings:
        raise UnsupportedModelError(
            f"--max-model-len {settings.max_model_len} exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    log.info("loading %s (%s, %s on %s)", folder, cfg.model_type, dtype, device)
    model = build_model(
        folder,
        dtype=dtype,
        device=device,
        max_rows=settings.max_num_seqs,
        max_len=settings.max_model_len,
        cfg=cfg,
        pack=not settings.compile,  # inductor cannot take oneDNN-packed weights as inputs
    )
    bank = SlotBank(
        model, num_slots=settings.max_loras, max_rank=settings.max_lora_rank, fixed_window=settings.compile
    )
    name = served_name(settings, folder)
    registry = AdapterRegistry(base_name=name)
    store: dict[str, AdapterWeights] = {}  # CPU copies; slots are filled on demand
    for adapter_name, path in settings.lora_modules.items():
        store[adapter_name] = load_adapter(bank, registry, adapter_name, Path(path).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = Engine(
        ModelRunner(model, bank, compile=settings.compile),
        tokenizer,
        eos_ids=eos_token_ids(folder, cfg.eos_token_ids, tokenizer),
        prefill_chunk=settings.prefill_chunk,
        slot_table=SlotTable(settings.max_loras),
        adapter_weights=store.__getitem__,
        max_waiting=settings.max_waiting,
    )
    warm_up(engine)
    engine.start()
    log.info("model ready in %.1f s", time.monotonic() - start)
    return CompletionService(
        engine,
        tokenizer,
        registry,
        model_name=name,
        max_model_len=settings.max_model_len,
        vocab_size=cfg.vocab_size,
        request_timeout=settings.request_timeout,
    )


def load_adapter(bank: SlotBank, registry: AdapterRegistry, name: str, path: Path) -> AdapterWeights:
    """Read and validate (every problem at once) a PEFT adapter; register it. Slots load on demand."""
    check_name(name)
    start = time.monotonic()
    weights = validate(read_adapter_dir(path, name), bank.spec(), name)
    info = AdapterInfo(
        name=name,
        rank=weights.rank,
        alpha=weights.config.lora_alpha,
        target_modules=tuple(weights.target_suffixes),
        nbytes=weights.nbytes,
        source=str(path),
    )
    registry.add(info)
    log.info("adapter %s (rank %d, %s) validated in %.0f ms", name, info.rank,
             ",".join(info.target_modules), (time.monotonic() - start) * 1000)
    return weights


def warm_up(engine: Engine) -> None:
    """Compile every decode shape (with --compile), then run one short request, so the first real
    request pays neither compilation nor allocator warm-up."""
    from server.sequence import GenerationRequest

    start = time.monotonic()
    engine.runner.warm_up()
    if engine.runner.compiled:
        log.info("compiled %d decode graphs in %.1f s", engine.runner.warm_graphs, time.monotonic() - start)

    request = GenerationRequest("warmup", [1, 2, 3, 4], max_tokens=4, sampling=SamplingParams(temperature=0), ignore_eos=True)
    engine.submit(request, lambda event: None)
    engine.run_until_idle()

"""Build a ready-to-serve CompletionService from Settings: resolve, load, allocate, warm up.

The one place where the application's parts are built and wired: the engine core, the adapter
catalog (which unloads retired versions through the engine), the admin service and the
completion service, each given its collaborators and metrics hooks at construction."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from adapters.catalog import AdapterCatalog, AdapterVersion
from adapters.slot_bank import SlotBank
from adapters.slot_sizing import SlotPlan, fused_shapes, plan_slots, slot_bytes
from adapters.slot_table import SlotTable
from adapters.store import AdapterStore
from config.settings import Settings
from server.admin import AdminService
from server.device_map import describe, estimate_part_sizes, lora_slot_bytes, resolve_device_map
from server.engine import Engine
from server.errors import KVCacheBudgetError, UnsupportedModelError
from server.kv_cache import blocks_for, kv_bytes_per_token, pool_blocks
from server.linear import tensor_bytes
from server.hf_model import TransformersModel, load_transformers_model
from server.metrics import ServerMetrics
from server.model import Transformer
from server.model_config import ModelConfig, eos_ids
from server.model_impl import check_options, model_architecture
from server.model_source import EMBEDDED_NAME, resolve_model
from server.placement import PartSizes, Placement
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
        ids.update(eos_ids(json.loads(gen.read_text())))
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


def build_service(settings: Settings, metrics: ServerMetrics | None = None) -> CompletionService:
    """`metrics`: the app's metrics (request timelines, adapter load times); None: not measured."""
    from transformers import AutoTokenizer

    start = time.monotonic()
    folder = resolve_model(settings.model)
    impl, cfg = model_architecture(settings.model_impl, folder)
    check_options(impl, settings)
    if settings.max_model_len > cfg.max_position_embeddings:
        raise UnsupportedModelError(
            f"--max-model-len {settings.max_model_len} exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    quantization = None if settings.quantization == "none" else settings.quantization
    placement = None if settings.device_map is None else place(settings, cfg, settings.device_map, quantization)
    # Under a device map, any GPU part decides the dtype (bfloat16 by default), as --device cuda does.
    device = pick_device(settings.device) if placement is None else main_device(placement)
    dtype = pick_dtype(settings.dtype, device)
    log.info("loading %s (%s, %s, %s on %s)", folder, cfg.model_type, impl, dtype, device)
    if placement is not None:
        log.info("device map: %s", json.dumps(describe(placement)))
    if impl == "transformers":
        model: Transformer | TransformersModel = load_transformers_model(folder, dtype=dtype, device=device)
        # Sized from the loaded model: its KV heads as its attention computes them, its slots
        # over whatever linear layers it has.
        cfg = model.cfg
        kv_blocks = kv_plan(settings, cfg, dtype.itemsize)
        model.allocate(max_rows=settings.max_num_seqs, max_len=settings.max_model_len, num_blocks=kv_blocks,
                       block_size=settings.block_size)
        per_slot = slot_bytes(fused_shapes(model.linear_parts()), max_rank=settings.max_lora_rank,
                              dtype_bytes=dtype.itemsize)
        slots = slot_plan(settings, cfg, dtype.itemsize, per_slot=per_slot)
    else:
        slots = slot_plan(settings, cfg, dtype.itemsize)  # before loading: a budget too small fails fast
        kv_blocks = kv_plan(settings, cfg, dtype.itemsize)
        model = build_model(
            folder, dtype=dtype, device=device, max_rows=settings.max_num_seqs, max_len=settings.max_model_len,
            cfg=cfg, quantization=quantization, quantize_lm_head=settings.quantize_lm_head, placement=placement,
            kv_blocks=kv_blocks, block_size=settings.block_size,
        )
    footprint = model.memory_footprint()
    log.info("weights: decoder projections %.1f MB (%s), other %.1f MB",
             footprint["linear_bytes"] / 1e6, settings.quantization, footprint["other_weight_bytes"] / 1e6)
    log.info("KV cache: %d blocks of %d positions = %d tokens in %.1f MB (%d requests of %d tokens at most; "
             "prefix caching %s)", kv_blocks, settings.block_size, kv_blocks * settings.block_size,
             footprint["kv_cache_bytes"] / 1e6, settings.max_num_seqs, settings.max_model_len,
             "on" if settings.enable_prefix_caching else "off")
    log.info("%s", slots.describe())
    # Eager decode keeps a copy of each row's slot (its loaded rank window), allocated on first use.
    row_bytes_max = 0 if settings.compile else settings.max_num_seqs * slots.bytes_per_slot
    if row_bytes_max:
        log.info("LoRA row copies for decode: up to %.1f MB (%d rows x one slot; less for adapters below rank %d)",
                 row_bytes_max / 1e6, settings.max_num_seqs, settings.max_lora_rank)
    bank = SlotBank(model, num_slots=slots.count, max_rank=slots.rank, fixed_window=settings.compile)
    modules = None
    if settings.max_module_slots and isinstance(model, Transformer):  # check_options refuses the other path
        modules = model.attach_module_bank(settings.max_module_slots, cfg.vocab_size + settings.max_added_tokens)
        log.info("module slots (modules_to_save): %d of %d tokens (%d added), %.1f MB", modules.num_slots,
                 modules.max_vocab, settings.max_added_tokens, modules.bytes / 1e6)
    name = served_name(settings, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = Engine(
        ModelRunner(model, bank, compile=settings.compile),
        eos_ids=eos_token_ids(folder, cfg.eos_token_ids, tokenizer),
        prefill_chunk=settings.prefill_chunk,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        long_prefill_token_threshold=settings.long_prefill_token_threshold,
        slot_table=SlotTable(slots.count),
        # Every request carries its version's weights (the catalog resolves them on accept).
        max_waiting=settings.max_waiting,
        on_slot_load=None if metrics is None else metrics.observe_slot_load,
        prefix_caching=settings.enable_prefix_caching,
        base_name=name,
    )
    # Adapters named at start are this run's unless --persist-lora-modules: a store of their own,
    # in a temp folder that goes with the process.
    run_store = None if settings.persist_lora_modules or not settings.lora_modules else AdapterStore.temporary()
    catalog = AdapterCatalog(
        AdapterStore(data_dir(settings)), bank.spec(), base_name=name, max_cpu=settings.max_cpu_loras,
        run_store=run_store, on_disk_load=None if metrics is None else metrics.observe_disk_load,
        # A version another process sharing the store replaced or deleted leaves its slot here too.
        on_retired=engine.unload_adapter,
    )
    for adapter_name, path in settings.lora_modules.items():
        load_adapter(catalog, adapter_name, Path(path).expanduser(), persist=settings.persist_lora_modules)
    warm_up(engine)
    engine.start()
    log.info("model ready in %.1f s", time.monotonic() - start)
    admin = AdminService(
        catalog, engine, adapter_roots=settings.adapter_roots, max_upload_bytes=int(settings.max_upload_mb * 1e6),
        model_info={
            "model": name, "model_type": cfg.model_type, "model_impl": impl,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "quantization": settings.quantization, "compile": settings.compile,
            "device_map": None if placement is None else describe(placement),
            "memory": {**footprint, "lora_slot_bytes": sum(tensor_bytes(t) for t in bank.buffers()),
                       "lora_row_bytes_max": row_bytes_max},
            "lora_slots": slots.info(),
            "module_slots": {"count": settings.max_module_slots,
                             "vocab": cfg.vocab_size + settings.max_added_tokens if modules else None,
                             "bytes": 0 if modules is None else modules.bytes},
            "kv_cache": {"blocks": kv_blocks, "block_size": settings.block_size,
                         "tokens": kv_blocks * settings.block_size, "bytes": footprint["kv_cache_bytes"],
                         "prefix_caching": settings.enable_prefix_caching},
        },
    )
    service = CompletionService(
        engine,
        tokenizer,
        catalog,
        model_name=name,
        max_model_len=settings.max_model_len,
        vocab_size=cfg.vocab_size,
        request_timeout=settings.request_timeout,
        admin=admin,
        metrics=metrics,
        max_loras=slots.count,
    )
    return service


def main_device(placement: Placement) -> torch.device:
    gpus = [d for d in placement.devices() if d != "cpu"]
    return torch.device(gpus[0] if gpus else "cpu")


def slot_plan(settings: Settings, cfg: ModelConfig, dtype_bytes: int, *, per_slot: int | None = None) -> SlotPlan:
    """--max-loras resolved (`auto`: what --lora-memory holds) for slots of `dtype_bytes` elements;
    `per_slot`: a slot's bytes when the config cannot say (the transformers-backed path)."""
    if per_slot is None:
        per_slot = lora_slot_bytes(cfg, max_rank=settings.max_lora_rank, dtype_bytes=dtype_bytes)
    return plan_slots(settings.max_loras, budget_bytes=settings.lora_memory, per_slot_bytes=per_slot,
                      rank=settings.max_lora_rank, compiled=settings.compile)


def kv_plan(settings: Settings, cfg: ModelConfig, dtype_bytes: int) -> int:
    """Blocks of the KV pool --kv-cache-memory holds; fails when not even one sequence of
    --max-model-len fits."""
    per_token = kv_bytes_per_token(num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                                   head_dim=cfg.head_dim, dtype_bytes=dtype_bytes)
    blocks = pool_blocks(settings.kv_cache_memory, bytes_per_token=per_token, block_size=settings.block_size,
                         max_rows=settings.max_num_seqs, max_len=settings.max_model_len)
    if blocks * settings.block_size < settings.max_model_len:
        need = blocks_for(settings.max_model_len, settings.block_size) * settings.block_size * per_token
        raise KVCacheBudgetError(
            f"--kv-cache-memory {settings.kv_cache_memory} bytes holds {blocks * settings.block_size} positions "
            f"({per_token} bytes each); one request of --max-model-len {settings.max_model_len} needs {need} bytes: "
            "raise --kv-cache-memory or lower --max-model-len")
    return blocks


def place(settings: Settings, cfg: ModelConfig, spec: str, quantization: str | None) -> Placement:
    """The placement `spec` (--device-map) asks for; `auto` sizes each part as it will be loaded.
    The dtype is the one `auto` placement leads to (GPUs if any), so the slot count sized here is
    the one build_service resolves once the device is known."""
    dtype_bytes = pick_dtype(settings.dtype, pick_device("auto")).itemsize

    def sizes() -> PartSizes:
        return estimate_part_sizes(
            cfg, dtype_bytes=dtype_bytes, quantization=quantization, quantize_lm_head=settings.quantize_lm_head,
            kv_blocks=kv_plan(settings, cfg, dtype_bytes), block_size=settings.block_size,
            num_slots=slot_plan(settings, cfg, dtype_bytes).count, max_rank=settings.max_lora_rank,
            max_len=settings.max_model_len, module_slots=settings.max_module_slots,
            max_vocab=cfg.vocab_size + settings.max_added_tokens,
        )

    return resolve_device_map(spec, cfg, sizes)


def data_dir(settings: Settings) -> Path:
    if settings.data_dir is not None:
        return settings.data_dir.expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loraswap"


def load_adapter(catalog: AdapterCatalog, name: str, path: Path, *, persist: bool) -> AdapterVersion:
    """Validate (every problem at once) and publish a PEFT adapter folder given at start (the
    operator's own path: no --adapter-roots check). A copy is kept for this run, or in the
    persistent store with `persist`; slots load on demand."""
    start = time.monotonic()
    store = catalog.store_for(persist=persist)
    info, _ = catalog.add(name, store.stage_dir(path), source=f"path:{path}", persist=persist)
    if not persist and name in catalog.store.names():
        log.warning("adapter %s: the start-up adapter is served instead of the stored one of that name "
                    "for this run", name)
    log.info("adapter %s (rank %d, %s, %s) ready in %.0f ms", name, info.rank, ",".join(info.target_modules),
             "persistent" if persist else "this run only", (time.monotonic() - start) * 1000)
    return info


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

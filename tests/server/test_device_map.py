"""--device-map wired into the model: sizes the planner is given equal what loading really
allocates, maps resolve against the devices this process sees, and a placed model keeps its KV
cache and LoRA slots with each layer. Only one device exists here (the CPU); splits across real
GPUs are exercised by bench/gpu_check.py (a CPU + CUDA split against a single-device model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.slot_bank import SlotBank
from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.device_map import DeviceMapError, estimate_part_sizes, resolve_device_map
from server.linear import Linear, tensor_bytes
from server.model import Transformer
from server.model_config import load_model_config
from server.placement import GIB, DeviceBudget, PartSizes, Placement
from server.weights import build_model
from tests.adapters.helpers import ALL_LINEAR, load_weights, native_logits, write_random_adapter
from tests.server.families import make_family
from tests.server.test_api import wait_ready

ROWS, LEN, SLOTS, RANK = 3, 64, 2, 8


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device_map")
    names = ("llama-tied", "llama-bias", "qwen3", "llama-mha-untied", "gemma3", "olmo2", "phi3")
    return {name: (make_family(name, root / name), root / name)[1] for name in names}


def actual_sizes(model: Transformer, bank: SlotBank) -> PartSizes:
    """Bytes each part really holds once built: weights as kept at run time, plus a layer's KV
    cache and the slot tensors of its projections. Models are built unpacked, as on a GPU (the
    only devices `auto` plans for): a packed copy of a tied head exists only on CPUs."""
    assert model.cache is not None
    slot_bytes: dict[int, int] = {}
    for i, layer in enumerate(model.model.layers):
        modules = [m for m in layer.modules() if getattr(m, "lora", None) is not None]
        slot_bytes[i] = sum(tensor_bytes(m.lora.a) + sum(tensor_bytes(b) for b in m.lora.bs) + tensor_bytes(m.lora.s)
                            for m in modules)

    def weight_bytes(module: torch.nn.Module) -> int:
        linears = [m for m in module.modules() if isinstance(m, Linear)]
        inside = {id(p) for m in linears for p in m.parameters()}  # incl. a bitsandbytes copy
        rest = sum(tensor_bytes(p) for p in module.parameters() if id(p) not in inside)
        return rest + sum(m.weight_bytes() for m in linears)

    layers = []
    for i, layer in enumerate(model.model.layers):
        k, v = model.cache.layer(i)
        layers.append(weight_bytes(layer) + tensor_bytes(k) + tensor_bytes(v) + slot_bytes[i])
    tied = model.cfg.tie_word_embeddings
    modules = model.module_bank  # modules_to_save copies: embeddings with the embedding, heads with the head
    embed_copies = 0 if modules is None else tensor_bytes(modules.embed)
    head_copies = 0 if modules is None else tensor_bytes(modules.head)
    return PartSizes(
        embed=tensor_bytes(model.model.embed_tokens.weight) + sum(tensor_bytes(b) for b in model.buffers(recurse=False))
        + embed_copies + (head_copies if tied else 0),
        layers=layers,
        norm=tensor_bytes(model.model.norm.weight),
        lm_head=0 if tied else model.lm_head.weight_bytes() + head_copies, tied=tied,
    )


@pytest.mark.parametrize("family", ["llama-tied", "llama-bias", "qwen3", "llama-mha-untied", "gemma3", "olmo2", "phi3"])
@pytest.mark.parametrize("quantization", [None, "int8", "nf4"])
def test_estimated_sizes_equal_what_loading_allocates(
    family_dirs: dict[str, Path], family: str, quantization: str | None
) -> None:
    folder = family_dirs[family]
    head = quantization is not None and family == "llama-mha-untied"
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=ROWS, max_len=LEN, pack=False,
                        quantization=quantization, quantize_lm_head=head)
    bank = SlotBank(model, num_slots=SLOTS, max_rank=RANK)
    estimate = estimate_part_sizes(model.cfg, dtype_bytes=4, quantization=quantization, quantize_lm_head=head,
                                   kv_blocks=ROWS * -(-LEN // 16), block_size=16, num_slots=SLOTS, max_rank=RANK,
                                   max_len=LEN)
    assert estimate == actual_sizes(model, bank)


@pytest.mark.parametrize("family", ["llama-tied", "llama-mha-untied"])
def test_module_slots_are_estimated_where_they_are_allocated(family_dirs: dict[str, Path], family: str) -> None:
    model = build_model(family_dirs[family], dtype=torch.float32, device="cpu", max_rows=ROWS, max_len=LEN, pack=False)
    max_vocab = model.cfg.vocab_size + 8
    model.attach_module_bank(2, max_vocab)
    bank = SlotBank(model, num_slots=SLOTS, max_rank=RANK)
    estimate = estimate_part_sizes(model.cfg, dtype_bytes=4, quantization=None, quantize_lm_head=False,
                                   kv_blocks=ROWS * -(-LEN // 16), block_size=16, num_slots=SLOTS, max_rank=RANK,
                                   max_len=LEN, module_slots=2, max_vocab=max_vocab)
    assert estimate == actual_sizes(model, bank)
    assert estimate.embed + estimate.lm_head > 4 * max_vocab * model.cfg.hidden_size * 4  # the copies count


def test_resolve_named_devices_against_what_is_visible(tiny_llama_dir: Path) -> None:
    cfg = load_model_config(tiny_llama_dir)
    n = cfg.num_hidden_layers
    assert resolve_device_map("cpu", cfg, pytest.fail, available=["cpu"]) == Placement("cpu", ("cpu",) * n, "cpu", "cpu")
    with pytest.raises(DeviceMapError, match=r"--device-map cuda: .*'cuda:0' is not available \(available: cpu\)"):
        resolve_device_map("cuda", cfg, pytest.fail, available=["cpu"])
    two = ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device_map("cuda:1", cfg, pytest.fail, available=two).devices() == ["cuda:1"]


def test_auto_without_gpus_is_the_cpu_and_sizes_are_not_needed(tiny_llama_dir: Path) -> None:
    cfg = load_model_config(tiny_llama_dir)
    placed = resolve_device_map("auto", cfg, pytest.fail, available=["cpu"], budgets=list)
    assert placed.devices() == ["cpu"]


def test_auto_splits_over_gpus_by_free_memory_and_says_what_is_missing(tiny_llama_dir: Path) -> None:
    cfg = load_model_config(tiny_llama_dir)  # 2 layers, tied head

    def sizes() -> PartSizes:
        return PartSizes(embed=GIB, layers=[4 * GIB] * cfg.num_hidden_layers, norm=0, lm_head=0, tied=True)

    available = ["cpu", "cuda:0", "cuda:1"]
    fits = [DeviceBudget("cuda:0", 6 * GIB), DeviceBudget("cuda:1", 6 * GIB)]
    placed = resolve_device_map("auto", cfg, sizes, available=available, budgets=lambda: fits)
    assert placed.layers == ("cuda:0", "cuda:1") and placed.boundaries() == [1]
    tight = [DeviceBudget("cuda:0", 5 * GIB), DeviceBudget("cuda:1", 3 * GIB)]
    with pytest.raises(DeviceMapError, match=r"needs 9.00 GiB .* GiB missing"):
        resolve_device_map("auto", cfg, sizes, available=available, budgets=lambda: tight)


def test_json_map_with_layer_ranges(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = load_model_config(tiny_llama_dir)
    spec = tmp_path / "map.json"
    spec.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cuda:0", "model.layers.1": "cpu"}))
    placed = resolve_device_map(str(spec), cfg, pytest.fail, available=["cpu", "cuda:0"])
    assert placed.layers == ("cuda:0", "cpu") and placed.boundaries() == [0, 1]
    spec.write_text(json.dumps({"model.layers.0-5": "cpu"}))
    with pytest.raises(DeviceMapError, match="out of range: the model has layers 0-1"):
        resolve_device_map(str(spec), cfg, pytest.fail, available=["cpu"])


def test_placed_model_keeps_cache_and_slots_with_its_layers_and_computes_the_same(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = family_dirs["llama-mha-untied"]
    n = load_model_config(folder).num_hidden_layers
    placement = Placement("cpu", ("cpu",) * n, "cpu", "cpu")
    plain = build_model(folder, dtype=torch.float32, device="cpu", max_rows=ROWS, max_len=LEN)
    placed = build_model(folder, dtype=torch.float32, device="meta", max_rows=ROWS, max_len=LEN, placement=placement)
    assert placed.layer_devices == [torch.device("cpu")] * n and placed.boundaries() == []
    assert placed.cache is not None
    assert all(t.device.type == "cpu" for i in range(n) for t in placed.cache.layer(i))
    adapter = write_random_adapter(tmp_path / "a", folder, rank=4, targets=ALL_LINEAR, seed=1, scale=0.05)
    banks = [SlotBank(m, num_slots=SLOTS, max_rank=RANK) for m in (plain, placed)]
    assert all(b.device.type == "cpu" for b in banks[1].buffers())
    for bank in banks:
        bank.load(0, load_weights(adapter, bank))
    ids = torch.arange(5, 17)[None]
    with torch.inference_mode():
        for slot in (0, banks[0].null_slot):
            torch.testing.assert_close(native_logits(placed, banks[1], ids, slot), native_logits(plain, banks[0], ids, slot),
                                       rtol=0, atol=0)


def test_boundaries_are_where_consecutive_layers_change_device(tiny_llama_dir: Path) -> None:
    model = build_model(tiny_llama_dir, dtype=torch.float32, device="cpu", max_rows=1, max_len=32)
    model.layer_devices = [torch.device("cuda:0"), torch.device("cuda:0")]  # as a device map would set them
    assert model.boundaries() == [0]
    model.layer_devices = [torch.device("cpu"), torch.device("cuda:1")]
    assert model.boundaries() == [1]


def serve(settings: Settings) -> TestClient:
    return TestClient(create_app(lambda metrics: build_service(settings, metrics)), client=("127.0.0.1", 40000))  # admin: loopback


def test_server_with_a_json_map_serves_and_reports_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "map.json"
    spec.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0-1": "cpu"}))
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=64, device_map=str(spec))
    with serve(conf) as client:
        wait_ready(client)
        info = client.get("/admin/model").json()
        assert info["device_map"] == {
            "map": {"model.embed_tokens": "cpu", "model.layers.0-1": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
            "devices": ["cpu"], "boundaries": [],
        }
        reply = client.post("/v1/completions", json={"model": info["model"], "prompt": "hi", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_server_with_an_impossible_map_fails_with_the_reason(tiny_llama_dir: Path) -> None:
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=64, device_map="cuda:3")
    with serve(conf) as client:
        client.app.state.holder.join(60)  # type: ignore[attr-defined]  # the load thread has given up
        body = client.get("/ready").json()
    assert body["status"] == "failed"
    assert "DeviceMapError: --device-map cuda:3: '--device-map': device 'cuda:3' is not available" in body["error"]

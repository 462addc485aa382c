"""Every way a PEFT LoRA adapter can be refused, and that the refusal says why.

A valid baseline adapter is made with PEFT itself on a tiny random Llama; each broken variant is a
copy of it with the JSON config edited or the safetensors file rewritten. Every rejection must be an
`InvalidAdapterError` whose `problems` name the fault in words an operator can act on. The last
part serves a valid adapter over HTTP (in process) and checks that a bad one stops the server build.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from safetensors.torch import load_file, save_file

from adapters.errors import InvalidAdapterError
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from adapters.registry import check_name
from adapters.slot_bank import SlotBank
from adapters.validation import AdapterWeights, SlotSpec, validate
from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.weights import build_model
from tests.server.families import make_family

NAME = "candidate"
SLOT_RANK = 16
RANK = 8
ALPHA = 16
# Untied embeddings: lm_head is a real module of both the HF model and the native one.
FAMILY = "llama-mha-untied"
NUM_LAYERS = 2
BASE_TARGETS = ["q_proj", "v_proj", "down_proj"]
SUPPORTED = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
# PEFT's key for a module's LoRA matrix.
KEY = "base_model.model.{module}.lora_{ab}.weight"
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"

Json = dict[str, Any]
Tensors = dict[str, torch.Tensor]


# ---- helpers ---------------------------------------------------------------------------------


def peft_adapter(hf_model: Any, folder: Path, *, target_modules: list[str] | str, r: int = RANK) -> Path:
    """Save a real PEFT LoRA adapter (random, non-zero A and B) of a copy of `hf_model`."""
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(
        copy.deepcopy(hf_model),
        peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=target_modules, init_lora_weights=False),
    )
    model.save_pretrained(folder)
    assert (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_tensors(folder: Path, change: Callable[[Tensors], None]) -> None:
    path = folder / WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def load(folder: Path, spec: SlotSpec) -> AdapterWeights:
    """What the server does with an adapter folder (server/bootstrap.py load_adapter)."""
    return validate(read_adapter_dir(folder, NAME), spec, NAME)


def rejected(folder: Path, spec: SlotSpec) -> InvalidAdapterError:
    """The adapter must be refused with InvalidAdapterError, whose message lists every problem."""
    with pytest.raises(InvalidAdapterError) as info:
        load(folder, spec)
    error = info.value
    assert error.name == NAME
    assert error.problems, "an InvalidAdapterError without problems"
    message = str(error)
    assert repr(NAME) in message
    for problem in error.problems:
        assert problem in message
    return error


def assert_problem(error: InvalidAdapterError, *phrases: str) -> str:
    """One single problem contains every phrase; returns it."""
    for problem in error.problems:
        if all(phrase in problem for phrase in phrases):
            return problem
    raise AssertionError(f"no problem contains all of {phrases!r}; problems: {error.problems!r}")


class CreatesFileWhenUnpickled:
    """A pickle payload whose loading creates `path` (no shell involved)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(HF model, its folder): a tiny random Llama with untied embeddings."""
    folder = tmp_path_factory.mktemp("base") / FAMILY
    return make_family(FAMILY, folder), folder


@pytest.fixture(scope="module")
def spec(base: tuple[Any, Path]) -> SlotSpec:
    _, folder = base
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=2, max_len=32)
    return SlotBank(model, num_slots=2, max_rank=SLOT_RANK).spec()


@pytest.fixture(scope="module")
def valid_dir(base: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf_model, _ = base
    return peft_adapter(hf_model, tmp_path_factory.mktemp("valid") / "adapter", target_modules=BASE_TARGETS)


@pytest.fixture
def adapter(valid_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the valid adapter, for one test to break."""
    return Path(shutil.copytree(valid_dir, tmp_path / "adapter"))


# ---- the baseline is accepted ----------------------------------------------------------------


def test_baseline_adapter_is_valid(valid_dir: Path, spec: SlotSpec) -> None:
    weights = load(valid_dir, spec)
    expected = {
        f"model.layers.{i}.{m}"
        for i in range(NUM_LAYERS)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert set(weights.modules) == expected
    assert weights.rank == RANK
    stored = load_file(valid_dir / WEIGHTS_FILE)
    for module, lora in weights.modules.items():
        assert lora.scaling == pytest.approx(ALPHA / RANK)
        assert torch.equal(lora.a, stored[KEY.format(module=module, ab="A")].float())
        assert torch.equal(lora.b, stored[KEY.format(module=module, ab="B")].float())
        assert lora.a.abs().sum() > 0 and lora.b.abs().sum() > 0  # init_lora_weights=False


def test_all_linear_is_accepted(base: tuple[Any, Path], spec: SlotSpec, tmp_path: Path) -> None:
    hf_model, _ = base
    folder = peft_adapter(hf_model, tmp_path / "all-linear", target_modules="all-linear")
    assert json.loads((folder / CONFIG_FILE).read_text())["target_modules"]  # PEFT may expand it
    edit_config(folder, target_modules="all-linear")  # and the literal string must work too
    weights = load(folder, spec)
    assert set(weights.modules) == set(spec.targets)  # every projection, never lm_head
    assert len(weights.modules) == 7 * NUM_LAYERS


# ---- config problems -------------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, Json, tuple[str, ...]]] = [
    ("dora-without-magnitudes", {"use_dora": True}, ("use_dora is true but its lora_magnitude_vector is missing",)),
    (
        "modules-to-save",
        {"modules_to_save": ["lm_head"]},
        ("modules_to_save=['lm_head']", "this server has no module slots", "--max-module-slots"),
    ),
    ("trainable-tokens-string", {"trainable_token_indices": "all"}, ("trainable_token_indices must be a non-empty list",)),
    ("trainable-tokens-negative", {"trainable_token_indices": [1, -2]}, ("trainable_token_indices must be a non-empty list",)),
    ("trainable-tokens-huge", {"trainable_token_indices": {"embed_tokens": [2**40]}},
     ("trainable_token_indices must be a non-empty list",)),
    ("trainable-tokens-empty", {"trainable_token_indices": {"embed_tokens": []}},
     ("trainable_token_indices must be a non-empty list",)),
    ("trainable-tokens-no-slots", {"trainable_token_indices": [1, 2]},
     ("trainable_token_indices", "no module slots", "--max-module-slots")),
    ("bias-all", {"bias": "all"}, ("bias is 'all'", "only bias='none' is supported")),
    ("bias-lora-only", {"bias": "lora_only"}, ("bias is 'lora_only'", "only bias='none' is supported")),
    ("prefix-tuning", {"peft_type": "PREFIX_TUNING"}, ("'PREFIX_TUNING'", "only LORA adapters are supported")),
    (
        "unknown-target",
        {"target_modules": ["q_proj", "c_attn"]},
        ("target module 'c_attn' does not exist in the base model",),
    ),
    (
        "lm-head-target",
        {"target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]},
        ("LoRA on lm_head is not supported by the slots", f"supported targets: {SUPPORTED}"),
    ),
    (
        "embed-tokens-target",
        {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
        ("LoRA on embed_tokens is not supported by the slots", f"supported targets: {SUPPORTED}"),
    ),
    (
        "regex-matches-nothing",
        {"target_modules": "nothing_matches_.*"},
        ("target_modules 'nothing_matches_.*' matches no module of the base model",),
    ),
    ("rank-zero", {"r": 0}, ("r must be an integer from 1 to 65536, got 0",)),
    ("no-targets", {"target_modules": []}, ("target_modules is empty",)),
    # Hostile values (issue 16): each is a 400 naming its field, never a 500 or a served adapter.
    ("alpha-1e38", {"lora_alpha": 1e38}, ("the LoRA scaling (lora_alpha / r) is 1.25e+37", "at most 10000")),
    ("alpha-nan", {"lora_alpha": float("nan")}, ("lora_alpha must be a finite number, got nan",)),
    ("alpha-infinity", {"lora_alpha": float("inf")}, ("lora_alpha must be a finite number, got inf",)),
    ("alpha-string", {"lora_alpha": "16"}, ("lora_alpha must be a finite number, got '16'",)),
    ("rank-bool", {"r": True}, ("r must be an integer from 1 to 65536, got True",)),
    ("rank-huge", {"r": 2**70}, ("r must be an integer from 1 to 65536",)),
    ("rank-pattern-list", {"rank_pattern": [1, 2]}, ("rank_pattern must be an object mapping module patterns",)),
    ("rank-pattern-null-rank", {"rank_pattern": {"q_proj": None}}, ("rank_pattern['q_proj'] must be an integer",)),
    ("rank-pattern-zero-rank", {"rank_pattern": {"q_proj": 0}}, ("rank_pattern['q_proj'] must be an integer",)),
    ("rank-pattern-bad-regex", {"rank_pattern": {"q_proj(": 4}}, ("rank_pattern: 'q_proj(' is not a valid regular expression",)),
    ("alpha-pattern-null", {"alpha_pattern": {"q_proj": None}}, ("alpha_pattern['q_proj'] must be a finite number, got None",)),
    ("targets-number", {"target_modules": 7}, ("target_modules must be a string or a list of non-empty strings, got 7",)),
    ("targets-bad-regex", {"target_modules": "q_proj[" }, ("target_modules: 'q_proj[' is not a valid regular expression",)),
    ("targets-list-of-numbers", {"target_modules": ["q_proj", 3]}, ("target_modules must be a string or a list",)),
    (
        "targets-catastrophic-regex",
        {"target_modules": r"(\w|\w\w|.)+\d{5}"},
        ("target_modules:", "takes too long to match module names", "simplify it"),
    ),
    ("targets-regex-too-long", {"target_modules": "a" * 5000}, ("the pattern is 5000 characters long",)),
    ("layers-float", {"layers_to_transform": 1.5}, ("layers_to_transform must be a layer index or a list",)),
    ("layers-negative", {"layers_to_transform": [-1]}, ("layers_to_transform must be a layer index or a list",)),
    ("layers-pattern-number", {"layers_pattern": 5}, ("layers_pattern must be a string or a list",)),
    ("use-rslora-string", {"use_rslora": "yes"}, ("use_rslora must be true or false, got 'yes'",)),
    ("modules-to-save-number", {"modules_to_save": 3}, ("modules_to_save must be a list of module names or null",)),
]


@pytest.mark.parametrize(("changes", "phrases"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_rejection(adapter: Path, spec: SlotSpec, changes: Json, phrases: tuple[str, ...]) -> None:
    load(adapter, spec)  # the untouched copy is fine: the edit alone makes it invalid
    edit_config(adapter, **changes)
    assert_problem(rejected(adapter, spec), *phrases)


def test_scaled_weights_that_overflow_the_slot_dtype_are_refused(adapter: Path, spec: SlotSpec) -> None:
    """A finite B of 3e38 becomes inf once scaled by alpha / r = 2: refused at validation, not
    served as token 0 until max_tokens."""

    def huge(tensors: Tensors) -> None:
        tensors[KEY.format(module=Q0, ab="B")][0, 0] = 3e38

    edit_tensors(adapter, huge)
    assert_problem(rejected(adapter, spec), Q0, "lora_B x scaling reaches inf", "too large for float32 slots")


def test_half_precision_slots_refuse_what_float32_slots_hold(adapter: Path, spec: SlotSpec) -> None:
    """The limit follows the slots' dtype: 1e5 fits float32 slots but not float16 ones (65,504)."""
    from dataclasses import replace

    def big(tensors: Tensors) -> None:
        tensors[KEY.format(module=Q0, ab="A")][0, 0] = 1e5

    edit_tensors(adapter, big)
    load(adapter, spec)
    assert_problem(rejected(adapter, replace(spec, dtype=torch.float16)), Q0, "lora_A reaches 100000", "float16")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.complex64])
def test_weights_of_other_dtypes_are_refused(adapter: Path, spec: SlotSpec, dtype: torch.dtype) -> None:
    def convert(tensors: Tensors) -> None:
        key = KEY.format(module=Q0, ab="A")
        tensors[key] = tensors[key].to(dtype)

    edit_tensors(adapter, convert)
    assert_problem(rejected(adapter, spec), "has dtype", "expected float16, bfloat16, float32 or float64")


def test_rank_above_the_slot_rank(base: tuple[Any, Path], spec: SlotSpec, tmp_path: Path) -> None:
    hf_model, _ = base
    folder = peft_adapter(hf_model, tmp_path / "r32", target_modules=["q_proj", "v_proj"], r=32)
    error = rejected(folder, spec)
    for module in (Q0, V1):
        assert_problem(error, module, f"rank 32 exceeds the slot rank {SLOT_RANK}", "--max-lora-rank")
    assert not any("shape" in p for p in error.problems), error.problems  # shapes match r=32


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_real_peft_lora_on_unsupported_module(base: tuple[Any, Path], spec: SlotSpec, tmp_path: Path, module: str) -> None:
    hf_model, _ = base
    folder = peft_adapter(hf_model, tmp_path / module, target_modules=["q_proj", module])
    assert_problem(rejected(folder, spec), f"LoRA on {module} is not supported by the slots", f"supported targets: {SUPPORTED}")


def with_lm_head_lora(adapter: Path) -> Path:
    """The adapter also targets lm_head, with A/B stored in the projection key format."""

    def add(tensors: Tensors) -> None:
        tensors[KEY.format(module="lm_head", ab="A")] = torch.randn(RANK, 64)
        tensors[KEY.format(module="lm_head", ab="B")] = torch.randn(96, RANK)

    edit_tensors(adapter, add)
    edit_config(adapter, target_modules=BASE_TARGETS + ["lm_head"])
    return adapter


def test_lm_head_weights_are_refused_as_unsupported(adapter: Path, spec: SlotSpec) -> None:
    """lm_head LoRA stored with the projection key format: the slots cannot hold it."""
    error = rejected(with_lm_head_lora(adapter), spec)
    assert_problem(error, "LoRA on lm_head is not supported by the slots", f"supported targets: {SUPPORTED}")


def test_lm_head_weights_are_not_called_untargeted(adapter: Path, spec: SlotSpec) -> None:
    error = rejected(with_lm_head_lora(adapter), spec)
    false_claims = [p for p in error.problems if "lm_head" in p and "not targeted" in p]
    assert not false_claims, error.problems


# ---- tensor problems -------------------------------------------------------------------------


def test_wrong_shape(adapter: Path, spec: SlotSpec) -> None:
    def reshape(tensors: Tensors) -> None:
        tensors[KEY.format(module=Q0, ab="A")] = torch.randn(RANK, 63)

    edit_tensors(adapter, reshape)
    error = rejected(adapter, spec)
    assert_problem(error, Q0, "lora_A has shape (8, 63), expected (8, 64)")
    assert len(error.problems) == 1, error.problems


def test_missing_tensor(adapter: Path, spec: SlotSpec) -> None:
    edit_tensors(adapter, lambda tensors: tensors.pop(KEY.format(module=V1, ab="B")))
    error = rejected(adapter, spec)
    assert_problem(error, V1, "missing tensor(s) lora_B")
    assert not any("lora_A" in p for p in error.problems), error.problems


@pytest.mark.parametrize(("value", "ab"), [(float("nan"), "A"), (float("inf"), "B")], ids=["nan", "inf"])
def test_non_finite_values(adapter: Path, spec: SlotSpec, value: float, ab: str) -> None:
    def poison(tensors: Tensors) -> None:
        tensors[KEY.format(module=DOWN0, ab=ab)][1, 2] = value

    edit_tensors(adapter, poison)
    error = rejected(adapter, spec)
    assert_problem(error, DOWN0, f"lora_{ab} contains NaN or infinite values")
    assert len(error.problems) == 1, error.problems


def test_extra_non_lora_tensor(adapter: Path, spec: SlotSpec) -> None:
    key = "base_model.model.model.norm.weight"
    edit_tensors(adapter, lambda tensors: tensors.__setitem__(key, torch.ones(64)))
    assert_problem(rejected(adapter, spec), f"unexpected tensor {key!r}", "not a lora_A/lora_B weight")


def test_weights_for_an_untargeted_module(adapter: Path, spec: SlotSpec) -> None:
    module = "model.layers.0.mlp.up_proj"  # in the base and a slot target, but not in target_modules

    def add(tensors: Tensors) -> None:
        tensors[KEY.format(module=module, ab="A")] = torch.randn(RANK, 64)
        tensors[KEY.format(module=module, ab="B")] = torch.randn(96, RANK)

    edit_tensors(adapter, add)
    assert_problem(rejected(adapter, spec), f"weights for {module}", "not targeted by adapter_config.json")


def test_weights_for_a_module_the_base_lacks(adapter: Path, spec: SlotSpec) -> None:
    module = "model.layers.7.self_attn.q_proj"  # the base has 2 layers

    def add(tensors: Tensors) -> None:
        tensors[KEY.format(module=module, ab="A")] = torch.randn(RANK, 64)
        tensors[KEY.format(module=module, ab="B")] = torch.randn(64, RANK)

    edit_tensors(adapter, add)
    assert_problem(rejected(adapter, spec), f"weights for {module}", "is not in the base model")


# ---- file problems ---------------------------------------------------------------------------


def test_pickle_weights_are_refused_and_never_loaded(
    adapter: Path, spec: SlotSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: this payload really does create its file when unpickled.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(control)))
    assert control.exists()

    marker = tmp_path / "unpickled-marker"
    (adapter / WEIGHTS_FILE).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(CreatesFileWhenUnpickled(marker)))

    def no_torch_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called on an adapter")

    monkeypatch.setattr(torch, "load", no_torch_load)
    error = rejected(adapter, spec)
    assert_problem(error, "adapter_model.bin is a pickle file", f"convert it to {WEIGHTS_FILE}")
    assert not marker.exists(), "the pickle file was unpickled"


def test_missing_config(adapter: Path, spec: SlotSpec) -> None:
    (adapter / CONFIG_FILE).unlink()
    assert_problem(rejected(adapter, spec), f"{CONFIG_FILE} is missing")


@pytest.mark.parametrize(
    ("text", "problem"),
    [('{"r": 8, "target_modules": ', "is not valid JSON"), ("[1, 2, 3]", "must hold a JSON object, got list"),
     ("\udcff", "is not valid JSON"), ("[" * 100_000 + "]" * 100_000, "is nested too deeply")],
    ids=["truncated", "not-object", "bad-utf8", "nested-100k"],
)
def test_config_is_not_valid_json(adapter: Path, spec: SlotSpec, text: str, problem: str) -> None:
    (adapter / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_problem(rejected(adapter, spec), f"{CONFIG_FILE} {problem}")


def test_missing_weights(adapter: Path, spec: SlotSpec) -> None:
    (adapter / WEIGHTS_FILE).unlink()
    assert_problem(rejected(adapter, spec), f"{WEIGHTS_FILE} is missing")


def test_truncated_safetensors(adapter: Path, spec: SlotSpec) -> None:
    path = adapter / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_problem(rejected(adapter, spec), f"{WEIGHTS_FILE} is not a valid safetensors file")


def test_safetensors_header_with_absurd_size(adapter: Path, spec: SlotSpec) -> None:
    (adapter / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**60) + b"{junk" * 20)
    start = time.monotonic()
    error = rejected(adapter, spec)
    assert time.monotonic() - start < 5.0  # refused from the header, nothing allocated
    assert_problem(error, f"{WEIGHTS_FILE} is not a valid safetensors file")


# ---- all problems at once --------------------------------------------------------------------


def test_several_problems_are_all_listed(adapter: Path, spec: SlotSpec) -> None:
    edit_config(adapter, use_dora=True, modules_to_save=["lm_head"])

    def damage(tensors: Tensors) -> None:
        tensors[KEY.format(module=Q0, ab="A")] = torch.randn(RANK, 63)
        tensors[KEY.format(module=DOWN0, ab="B")][0, 0] = float("nan")

    edit_tensors(adapter, damage)
    error = rejected(adapter, spec)
    assert len(error.problems) >= 4, error.problems
    assert_problem(error, "use_dora")
    assert_problem(error, "modules_to_save")
    assert_problem(error, Q0, "lora_A has shape (8, 63)")
    assert_problem(error, DOWN0, "lora_B contains NaN or infinite values")


def test_several_config_problems_are_all_listed(adapter: Path, spec: SlotSpec) -> None:
    edit_config(adapter, use_dora=True, modules_to_save=["lm_head"], bias="all", peft_type="IA3")
    error = rejected(adapter, spec)
    assert len(error.problems) >= 4, error.problems
    for phrase in ("use_dora", "modules_to_save", "bias is 'all'", "'IA3'"):
        assert_problem(error, phrase)


def test_several_tensor_problems_are_all_listed(adapter: Path, spec: SlotSpec) -> None:
    def damage(tensors: Tensors) -> None:
        tensors[KEY.format(module=Q0, ab="A")] = torch.randn(RANK, 63)
        tensors[KEY.format(module=DOWN0, ab="B")][0, 0] = float("nan")
        tensors.pop(KEY.format(module=V1, ab="B"))

    edit_tensors(adapter, damage)
    edit_config(adapter, target_modules=BASE_TARGETS + ["c_attn"])
    error = rejected(adapter, spec)
    assert len(error.problems) >= 4, error.problems
    assert_problem(error, Q0, "lora_A has shape (8, 63)")
    assert_problem(error, DOWN0, "lora_B contains NaN or infinite values")
    assert_problem(error, V1, "missing tensor(s) lora_B")
    assert_problem(error, "'c_attn' does not exist")


# ---- adapter names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 65, "name with space"], ids=["empty", "slash", "dotdot", "too-long", "space"])
def test_bad_adapter_names(name: str) -> None:
    with pytest.raises(InvalidAdapterError) as info:
        check_name(name)
    assert_problem(info.value, "1-64 characters of letters, digits")


@pytest.mark.parametrize("name", ["my-adapter_v1.2", "x" * 64, "A"])
def test_good_adapter_names(name: str) -> None:
    check_name(name)


# ---- over HTTP -------------------------------------------------------------------------------

BASE_NAME = "tiny-llama"  # the folder name of tests/conftest.py's tiny_llama_dir


def http_settings(model_dir: Path, adapters: dict[str, str]) -> Settings:
    return Settings(model=str(model_dir), max_num_seqs=2, max_model_len=64, lora_modules=adapters)


@pytest.fixture(scope="module")
def llama_adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    hf_model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return peft_adapter(hf_model, tmp_path_factory.mktemp("llama-adapter") / "good", target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, llama_adapter_dir: Path) -> Iterator[TestClient]:
    settings = http_settings(tiny_llama_dir, {"good": str(llama_adapter_dir)})
    app = create_app(lambda metrics: build_service(settings, metrics))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 120
        while True:
            response = test_client.get("/ready")
            if response.status_code == 200:
                break
            assert response.json().get("status") != "failed", response.text
            assert time.monotonic() < deadline, f"not ready in time: {response.text}"
            time.sleep(0.05)
        yield test_client


def openai_error(response: Response, status: int) -> Json:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def complete_ok(client: TestClient, model: str) -> Json:
    response = client.post(
        "/v1/completions",
        json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    assert body["usage"]["completion_tokens"] == 3
    return body


def test_models_lists_the_adapter(client: TestClient, llama_adapter_dir: Path) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    cards = {card["id"]: card for card in response.json()["data"]}
    assert set(cards) == {BASE_NAME, "good"}
    assert cards["good"]["parent"] == BASE_NAME
    # Names only: no server path reaches a client of the inference API (the admin API has them).
    assert cards["good"]["root"] is None and str(llama_adapter_dir) not in response.text
    assert cards[BASE_NAME]["parent"] is None


def test_completion_with_the_adapter(client: TestClient) -> None:
    complete_ok(client, "good")


def test_unknown_adapter_is_404_and_the_server_keeps_serving(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "missing-adapter", "prompt": "Hello", "max_tokens": 2})
    error = openai_error(response, 404)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert "missing-adapter" in error["message"]
    assert "good" not in error["message"]  # other tenants' adapter names are not listed
    complete_ok(client, "good")
    complete_ok(client, BASE_NAME)
    assert client.get("/v1/models").status_code == 200


def test_build_service_refuses_an_invalid_adapter(tiny_llama_dir: Path, llama_adapter_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(llama_adapter_dir, tmp_path / "bad"))
    edit_config(bad, use_dora=True)
    with pytest.raises(InvalidAdapterError) as info:
        build_service(http_settings(tiny_llama_dir, {"bad": str(bad)}))
    assert info.value.name == "bad"
    assert_problem(info.value, "use_dora is true but its lora_magnitude_vector is missing")


def test_many_patterns_share_one_time_budget(adapter: Path, spec: SlotSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of 1,000 rank_pattern keys is cheap, but matching all of them against every module
    is bounded in total: refused once the config's budget is spent, not after minutes."""
    from adapters import patterns

    monkeypatch.setattr(patterns, "CONFIG_BUDGET_S", 0.0)  # spent at once: the refusal path, fast
    edit_config(adapter, rank_pattern={f"layer{i}\\.never": 4 for i in range(1000)})
    assert_problem(rejected(adapter, spec), "takes more than 0 s in all", "fewer or simpler patterns")

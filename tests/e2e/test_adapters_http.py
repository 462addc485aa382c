"""End to end with adapters: the real server with --lora-modules on the embedded model; greedy
generations through the HTTP API (plain LoRA, DoRA, a weighted mix of adapters) are
token-identical to PEFT's generate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.e2e.server_process import Server, openai_client, running_server

pytestmark = pytest.mark.e2e

BASE = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
NEW_TOKENS = 20
ADAPTERS = {
    # Small alphas keep the random adapters' outputs language-like but different from the base.
    "attn-r8": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-r16": dict(r=16, lora_alpha=2, target_modules="all-linear", use_rslora=True),
    "dora-qv": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True),
}
MIX = "attn-r8:0.7+all-r16:0.5"  # the first is not rsLoRA: PEFT's cat mix takes its config


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.model_source import resolve_model

    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        base = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **spec))
        with torch.no_grad():  # strengthen the random adapters so greedy answers visibly differ
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(4.0)
                if "lora_magnitude_vector" in pname:  # PEFT starts DoRA at ||W + B A||: move it
                    param.mul_(0.8 + 0.4 * torch.rand_like(param))
        peft_model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def server(adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    modules = [f"{name}={path}" for name, path in adapter_dirs.items()]
    args = ["--max-num-seqs", "4", "--max-model-len", "512", "--max-loras", "2", "--max-lora-rank", "16",
            "--lora-modules", *modules]
    with httpx.Client(trust_env=False) as http, running_server(args, tmp_path_factory.mktemp("srv"), http) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server) as api:
        yield api


def peft_greedy(adapter_dir: Path | None, prompt_ids: list[int],
                mix: dict[str, tuple[Path, float]] | None = None) -> list[int]:
    """PEFT's greedy tokens under one adapter, none, or a weighted `mix` (name -> (folder,
    weight)) combined by add_weighted_adapter(combination_type="cat")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.model_source import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    if mix:
        (first, (folder, _)), *rest = mix.items()
        model = PeftModel.from_pretrained(model, folder, adapter_name=first)
        for name, (folder, _) in rest:
            model.load_adapter(folder, adapter_name=name)
        model.add_weighted_adapter(list(mix), [w for _, w in mix.values()], "mix", combination_type="cat")
        model.set_adapter("mix")
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([prompt_ids]),
            # An explicit mask: otherwise generate masks every prompt token equal to pad_token_id,
            # and in a chat prompt <|im_end|> (the pad token) is a real token.
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2,
        )
    return out[0, len(prompt_ids):].tolist()


def test_models_lists_adapters_with_parent(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        assert getattr(cards[name], "parent", None) == BASE
        dora = name == "dora-qv"
        assert getattr(cards[name], "features", None) == {"dora": dora, "modules_to_save": [], "trainable_tokens": 0,
                                                          "scalable": not dora, "mixable": not dora}


def test_greedy_tokens_equal_peft(client: openai.OpenAI, adapter_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from server.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    outputs = {}
    for name in [BASE, *ADAPTERS]:
        response = client.completions.create(
            model=name, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert response.usage is not None and response.usage.completion_tokens == NEW_TOKENS
        outputs[name] = response.choices[0].text
        expected = peft_greedy(adapter_dirs.get(name), prompt_ids)
        assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), name
    assert len(set(outputs.values())) == len(ADAPTERS) + 1, outputs  # each adapter really changes the answer


def test_unknown_adapter_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)


def test_lora_scale_through_the_official_client(client: openai.OpenAI) -> None:
    """`lora_scale` (sent by the openai client through extra_body): 0 gives the base model's
    answer, 1 the adapter's own, 2 another one; a scale on the base model is a 400."""
    name = next(iter(ADAPTERS))

    def answer(model: str, **extra: float) -> str:
        response = client.completions.create(model=model, prompt=QUESTION, max_tokens=NEW_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True, **extra})
        return response.choices[0].text

    plain, base = answer(name), answer(BASE)
    assert plain != base
    assert answer(name, lora_scale=0.0) == base
    assert answer(name, lora_scale=1.0) == plain
    assert answer(name, lora_scale=2.0) not in (plain, base)
    with pytest.raises(openai.BadRequestError, match="lora_scale"):
        answer(BASE, lora_scale=0.5)


def chat_ids(text: str) -> list[int]:
    from transformers import AutoTokenizer

    from server.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def test_a_weighted_mix_equals_peft_in_either_form(client: openai.OpenAI, adapter_dirs: dict[str, Path]) -> None:
    """`model: "a:0.7+b:0.5"` and the `adapters` field give PEFT's add_weighted_adapter tokens."""
    prompt_ids = chat_ids(QUESTION)

    def answer(model: str, **extra: object) -> str:
        response = client.completions.create(model=model, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True, **extra})
        assert response.model == model or "adapters" in extra
        return response.choices[0].text

    terms = [(term.split(":")[0], float(term.split(":")[1])) for term in MIX.split("+")]
    expected = peft_greedy(None, prompt_ids, {name: (adapter_dirs[name], w) for name, w in terms})
    from transformers import AutoTokenizer

    from server.model_source import resolve_model

    want = AutoTokenizer.from_pretrained(resolve_model(None)).decode(expected, skip_special_tokens=True)
    mixed = answer(MIX)
    assert mixed == want
    assert answer(BASE, adapters=[{"name": n, "weight": w} for n, w in terms]) == want
    assert mixed not in (answer("attn-r8"), answer("all-r16"), answer(BASE))


def test_dora_refuses_scales_and_mixes_and_a_mix_refuses_lora_scale(client: openai.OpenAI) -> None:
    def ask(model: str, **extra: object) -> None:
        client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body=extra)

    with pytest.raises(openai.BadRequestError, match="DoRA"):
        ask("dora-qv", lora_scale=0.5)
    with pytest.raises(openai.BadRequestError, match="DoRA"):
        ask("dora-qv+attn-r8")
    with pytest.raises(openai.BadRequestError, match="DoRA"):
        ask("dora-qv:0.5")
    with pytest.raises(openai.BadRequestError, match="lora_scale"):
        ask(MIX, lora_scale=0.5)
    with pytest.raises(openai.BadRequestError, match="base model"):
        ask(f"{BASE}+attn-r8")
    ask("dora-qv:1")  # weight 1 is the adapter itself

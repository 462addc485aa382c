"""lm-evaluation-harness (pinned) scores a real server process through its OpenAI-completions model
type (`local-completions`: loglikelihoods from `echo` + `logprobs`, generations with stop
strings, the tokenizer read from the server's /tokenizer_info and /tokenize), and its scores equal
those of its Hugging Face backend on the same model: the embedded model, and the `french` demo
adapter through PEFT. Two small local tasks (tests/e2e/lm_eval_data, committed): a multiple-choice
task (acc, acc_norm) and a generation task (exact_match). Nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.model_source import EMBEDDED_NAME, resolve_model
from tests.e2e.server_process import REPO_ROOT, Server, running_server

DATA = Path(__file__).parent / "lm_eval_data"
ADAPTER = REPO_ROOT / "examples" / "adapters" / "french"
TASKS = ("loraswap_mc", "loraswap_gen")
METRICS = {"loraswap_mc": ("acc,none", "acc_norm,none"), "loraswap_gen": ("exact_match,none",)}


def write_tasks(folder: Path) -> Path:
    """The two task definitions, reading the committed data by absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test"}
    mc = {**common, "task": "loraswap_mc", "dataset_kwargs": {"data_files": {"test": str(DATA / "multiple_choice.jsonl")}},
          "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
          "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    gen = {**common, "task": "loraswap_gen", "dataset_kwargs": {"data_files": {"test": str(DATA / "generation.jsonl")}},
           "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
           "target_delimiter": " ", "generation_kwargs": {"until": ["\n", ".", ","], "max_gen_toks": 8, "do_sample": False},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                            "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": ["^\\s+|\\s+$"]}]}
    for spec in (mc, gen):  # JSON is YAML
        (folder / f"{spec['task']}.yaml").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No hub, no proxy for loopback, caches in a temporary folder."""
    patch = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf-cache")
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(cache / "datasets"), "NO_PROXY": "127.0.0.1,localhost",
                        "no_proxy": "127.0.0.1,localhost", "TOKENIZERS_PARALLELISM": "false"}.items():
        patch.setenv(name, value)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Iterator[Server]:
    log_dir = tmp_path_factory.mktemp("lm-eval-server")
    with httpx.Client(trust_env=False) as http, running_server(
        ["--max-num-seqs", "4", "--max-model-len", "512", "--lora-modules", f"french={ADAPTER}"], log_dir, http
    ) as srv:
        yield srv


def evaluate(model: str, model_args: dict[str, Any], tasks_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, list[Any]]]:
    """The scores of each task, and each document's responses (loglikelihoods, generations)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                  batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0, log_samples=True)
    assert out is not None
    scores = {task: {m: float(out["results"][task][m]) for m in METRICS[task]} for task in TASKS}
    samples = {task: [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])] for task in TASKS}
    return scores, samples


@pytest.mark.parametrize("adapter", [None, "french"], ids=["base", "french"])
def test_lm_eval_scores_the_server_as_its_hf_backend_scores_the_model(
    server: Server, adapter: str | None, tmp_path: Path
) -> None:
    tasks_dir = write_tasks(tmp_path / "tasks")
    served, served_samples = evaluate("local-completions", {
        "model": adapter or EMBEDDED_NAME, "base_url": f"{server.base_url}/v1/completions",
        "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True, "max_length": 512,
    }, tasks_dir)
    reference_args: dict[str, Any] = {"pretrained": str(resolve_model(None)), "dtype": "float32", "device": "cpu"}
    if adapter is not None:
        reference_args["peft"] = str(ADAPTER)
    reference, reference_samples = evaluate("hf", reference_args, tasks_dir)
    assert served_samples["loraswap_gen"] == reference_samples["loraswap_gen"]  # the very same generations
    for ours, theirs in zip(served_samples["loraswap_mc"], reference_samples["loraswap_mc"], strict=True):
        for (ll, greedy), (ref_ll, ref_greedy) in zip((r[0] for r in ours), (r[0] for r in theirs), strict=True):
            assert ll == pytest.approx(ref_ll, abs=2e-3) and greedy == ref_greedy  # each choice's loglikelihood
    print(f"lm-eval scores, {adapter or 'base'}: served {served}, hf backend {reference}")  # for the record (-s)
    assert served == reference
    if adapter is None:  # real scores, not an empty run (on these tasks the base model is right 6 to 9 times in 10)
        assert 0.5 < served["loraswap_mc"]["acc,none"] < 1 and 0.5 < served["loraswap_gen"]["exact_match,none"] < 1

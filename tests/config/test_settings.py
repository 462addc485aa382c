from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import Settings, load_settings
from server.cli import build_parser, main, settings_from_args

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LORASWAP_") and key != "LORASWAP_CACHE":
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.dtype, s.device, s.model) == ("127.0.0.1", 8000, "auto", "auto", None)


def test_example_file_loads() -> None:
    assert load_settings(EXAMPLE).max_model_len == 2048


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('port = 9001\nmax_num_seqs = 3\nmax_model_len = 512\nmodel = "org/file-model"\n')
    monkeypatch.setenv("LORASWAP_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("LORASWAP_MAX_MODEL_LEN", "1024")
    s = load_settings(config, max_model_len=256, port=None)
    assert s.port == 9001  # file
    assert s.max_num_seqs == 5  # env beats file
    assert s.max_model_len == 256  # flag beats env
    assert s.model == "org/file-model"


def test_cli_flags_map_to_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "/m", "--port", "9", "--max-num-seqs", "2", "--max-model-len", "64",
         "--dtype", "float32", "--device", "cpu", "--host", "0.0.0.0"]
    )
    s = settings_from_args(args)
    assert (s.model, s.port, s.max_num_seqs, s.max_model_len, s.dtype, s.device, s.host) == (
        "/m", 9, 2, 64, "float32", "cpu", "0.0.0.0"
    )


def test_invalid_values_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError):
        Settings(max_num_seqs=0)
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "no_such_setting" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2


# ---- --max-loras auto and --lora-memory -----------------------------------------------------


def test_max_loras_is_auto_or_a_number() -> None:
    assert (Settings().max_loras, Settings().lora_memory) == ("auto", 2**30)
    assert Settings(max_loras="auto").max_loras == "auto"
    assert Settings(max_loras=4096).max_loras == 4096
    assert Settings(max_loras="12").max_loras == 12  # env and flags give strings
    for bad in (0, -1, 4097, "many", "", 2.5):
        with pytest.raises(ValidationError, match="max_loras"):
            Settings(max_loras=bad)


@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 * 2**20), ("1GiB", 2**30), ("2GB", 2 * 10**9), ("1.5 gib", 3 * 2**29), (" 4096 ", 4096),
    ("10kB", 10_000), ("1TiB", 2**40), (123456, 123456), (1e9, 10**9),
])
def test_lora_memory_sizes(text: object, expected: int) -> None:
    assert Settings(lora_memory=text).lora_memory == expected


@pytest.mark.parametrize(("value", "phrase"), [
    ("abc", "takes bytes or a number with a unit"), ("-1GiB", "must be positive"), ("inf", "takes bytes"),
    ("nan", "takes bytes"), ("1e400", "takes bytes"), ("1 GiBs", "takes bytes"), ("1K", "takes bytes"),
    ("9" * 10_000, "takes bytes"), ("0", "between 1 byte and 1 TiB"), (0, "between 1 byte"), (-5, "between 1 byte"),
    ("2TiB", "between 1 byte and 1 TiB"), (10**400, "between 1 byte"), (float("inf"), "must be finite"),
    (float("nan"), "must be finite"), (True, "takes a size"), (None, "takes bytes"), ([1], "takes bytes"),
])
def test_lora_memory_refuses_hostile_values(value: object, phrase: str) -> None:
    with pytest.raises(ValidationError, match=phrase):
        Settings(lora_memory=value)


def test_kv_cache_memory_is_a_size_checked_as_lora_memory_is() -> None:
    assert Settings().kv_cache_memory == 2**30 and Settings(kv_cache_memory="4GiB").kv_cache_memory == 4 * 2**30
    for bad in ("inf", "-1GiB", 0, True, "2TiB"):
        with pytest.raises(ValidationError, match="kv_cache_memory"):
            Settings(kv_cache_memory=bad)
    assert Settings().enable_prefix_caching is True and Settings().block_size == 16
    for bad_block in (0, -16, 1025, "x"):
        with pytest.raises(ValidationError, match="block_size"):
            Settings(block_size=bad_block)


def test_prefix_caching_switch_has_a_no_form() -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--no-enable-prefix-caching", "--kv-cache-memory", "512MiB"])
    assert args.enable_prefix_caching is False and args.kv_cache_memory == "512MiB"
    assert build_parser().parse_args(["serve"]).enable_prefix_caching is None  # not given: env, file or default


def test_lora_memory_from_env_file_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('lora_memory = "256MiB"\nmax_loras = "auto"\n')
    assert load_settings(config).lora_memory == 256 * 2**20
    monkeypatch.setenv("LORASWAP_LORA_MEMORY", "2GiB")
    monkeypatch.setenv("LORASWAP_MAX_LORAS", "6")
    assert (load_settings(config).lora_memory, load_settings(config).max_loras) == (2 * 2**30, 6)
    args = build_parser().parse_args(["serve", "--lora-memory", "3GB", "--max-loras", "auto"])
    s = settings_from_args(args)
    assert (s.lora_memory, s.max_loras) == (3 * 10**9, "auto")


# ---- flags derived from the settings model --------------------------------------------------


def test_every_setting_has_a_flag_and_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve"])
    assert set(vars(args)) == set(Settings.model_fields) | {"command", "config"}
    assert all(value is None for key, value in vars(args).items() if key != "command")  # env/file not overridden
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    usage = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert "--" + name.replace("_", "-") in usage
    assert "(default 1GiB)" in usage and "(default 8000)" in usage and "(default auto)" in usage


def test_flags_parse_into_settings(tmp_path: Path) -> None:
    adapter, root = tmp_path / "ad", tmp_path / "roots"
    args = build_parser().parse_args([
        "serve", "--max-loras", "3", "--max-num-batched-tokens", "1024", "--compile", "--quantization", "int8",
        "--lora-modules", f"a={adapter}", f"b={adapter}", "--adapter-roots", str(root), str(tmp_path),
        "--request-timeout", "2.5", "--data-dir", str(tmp_path), "--admin-token", "t", "--log-level", "debug",
        "--persist-lora-modules",
    ])
    s = settings_from_args(args)
    assert (s.max_loras, s.max_num_batched_tokens, s.compile, s.quantization) == (3, 1024, True, "int8")
    assert s.lora_modules == {"a": str(adapter), "b": str(adapter)}
    assert s.adapter_roots == [root, tmp_path] and s.data_dir == tmp_path
    assert (s.request_timeout, s.log_level, s.persist_lora_modules) == (2.5, "debug", True)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "t"
    assert (s.quantize_lm_head, s.max_num_batched_tokens) == (False, 1024)
    assert Settings().max_num_batched_tokens == 128


def test_bad_flag_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # choices: argparse refuses
        build_parser().parse_args(["serve", "--dtype", "int4"])
    for flags, phrase in [
        (["--max-loras", "lots"], "max_loras"), (["--lora-memory=-1GiB"], "must be positive"),
        (["--port", "http"], "port"), (["--max-num-batched-tokens", "8"], "max_num_batched_tokens"),
        (["--lora-modules", "no-equals"], "NAME=PATH"),
    ]:
        assert main(["serve", *flags]) == 2
        assert phrase in capsys.readouterr().err

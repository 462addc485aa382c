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

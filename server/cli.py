"""Command line: `loraswap serve [flags]` (also `python -m server serve`), and `loraswap serve-ray
[flags]`: the same server as N replicas on Ray Serve (server/api/ray_serve.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from pydantic_settings import BaseSettings

from config.ray_settings import RaySettings
from config.settings import Settings, load_settings
from server.logs import configure_logging

log = logging.getLogger("loraswap")


# How a value looks in --help; presentation only (names, defaults and descriptions live in Settings).
METAVARS = {
    "lora_modules": "NAME=PATH", "adapter_roots": "DIR", "device_map": "MAP", "max_loras": "{auto,N}",
    "lora_memory": "SIZE", "kv_cache_memory": "SIZE", "data_dir": "DIR",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap", description="Multi-LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    serve.add_argument("--config", type=Path, help="TOML settings file (see config/example.toml)")
    add_settings_flags(serve)
    ray = sub.add_parser("serve-ray", help="serve N engine replicas behind one ingress on Ray Serve")
    ray.add_argument("--config", type=Path, help="TOML settings file of each replica (see config/example.toml)")
    add_settings_flags(ray)
    add_settings_flags(ray, RaySettings)
    return parser


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseSettings] = Settings) -> None:
    """One flag per Settings field: `--max-num-seqs` for `max_num_seqs`, its help the field's
    description and default. Values stay strings for pydantic to validate, the one place that
    knows each type (`--max-loras auto|N`, `--lora-memory 1GiB`). Every default is None, so that
    only flags actually given override the environment and the config file."""
    for name, field in model.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **flag_options(name, field))


def flag_options(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse options of one field: bools are switches, Literals get choices, lists and dicts
    take one or more values (`--lora-modules` keeps NAME=PATH, parsed by Settings)."""
    shown = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    description = (field.description or "").rstrip(".")
    help_text = f"{description} (default {default_text(shown)})".replace("%", "%%")
    annotation = without_none(field.annotation)
    if annotation is bool:  # a switch; one that is on by default gets its --no- form too
        action = argparse.BooleanOptionalAction if shown is True else "store_true"
        return {"action": action, "default": None, "help": help_text}
    options: dict[str, Any] = {"default": None, "help": help_text, "metavar": METAVARS.get(name)}
    if get_origin(annotation) is Literal:
        options["choices"] = [str(choice) for choice in get_args(annotation)]
        options["metavar"] = None  # argparse shows the choices
    if get_origin(annotation) in (list, dict):
        options["nargs"] = "+"
    return options


def without_none(annotation: Any) -> Any:
    """`X | None` -> X; any other annotation as it is."""
    if get_origin(annotation) in (Union, UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def default_text(value: object) -> str:
    if value is None or value == [] or value == {}:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def settings_from_args(args: argparse.Namespace) -> Settings:
    fields = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return load_settings(args.config, **fields)


def ray_settings_from_args(args: argparse.Namespace) -> RaySettings:
    return RaySettings(**{k: v for k, v in vars(args).items() if k in RaySettings.model_fields and v is not None})


def serve(settings: Settings) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.bootstrap import build_service

    exit_code = 0
    server: uvicorn.Server | None = None

    def on_failure(message: str) -> None:
        nonlocal exit_code
        log.error("cannot serve: %s", message)
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(
        lambda metrics: build_service(settings, metrics),
        on_load_failure=on_failure,
        admin_token=settings.admin_token.get_secret_value() if settings.admin_token else None,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    )
    # On SIGTERM uvicorn stops accepting connections and lets open ones (streams included) finish
    # for up to drain_timeout seconds; the lifespan then stops the engine and the process exits 0.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        log_level=settings.log_level,
        # json: uvicorn configures no handlers of its own, so its lines reach the root JSON handler.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]  # float works
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM after a graceful shutdown; with this no-op as the handler it
    # restores, a drained SIGTERM ends the process with exit code 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        ray_settings = ray_settings_from_args(args) if args.command == "serve-ray" else None
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"loraswap: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return serve(settings)
    if args.command == "serve-ray" and ray_settings is not None:
        from server.api.ray_serve import serve_ray

        return serve_ray(settings, ray_settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())

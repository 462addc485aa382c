"""Command line: `loraswap serve [flags]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from config.settings import Settings, load_settings
from server.logs import configure_logging

log = logging.getLogger("loraswap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap", description="Multi-LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    # Defaults are None so that only flags actually given override env and config file.
    serve.add_argument("--config", type=Path, help="TOML settings file (see config/example.toml)")
    serve.add_argument("--model", help="local Hugging Face folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", help="name clients pass as `model`")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--device-map", metavar="MAP",
                       help="auto (spread over visible GPUs), cpu, cuda, cuda:N or a JSON file of part -> device")
    serve.add_argument("--max-num-seqs", type=int, help="rows decoded together (default 16)")
    serve.add_argument("--max-model-len", type=int, help="prompt + output tokens per row (default 2048)")
    serve.add_argument("--prefill-chunk", type=int, help="prompt tokens prefilled per engine step (default 512)")
    serve.add_argument("--max-loras", type=int, help="LoRA slots per targeted layer (default 8)")
    serve.add_argument("--max-lora-rank", type=int, help="rank of every LoRA slot (default 64)")
    serve.add_argument(
        "--lora-modules", nargs="+", metavar="NAME=PATH",
        help="PEFT adapters served by this run (not kept for the next start, unless --persist-lora-modules)",
    )
    serve.add_argument(
        "--persist-lora-modules", action="store_true", default=None,
        help="publish the --lora-modules adapters into the adapter store (--data-dir), as an upload would",
    )
    serve.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the model step"
    )
    serve.add_argument("--request-timeout", type=float, help="seconds before a request is cancelled (default 600)")
    serve.add_argument("--drain-timeout", type=float, help="seconds to finish running requests on SIGTERM (default 30)")
    serve.add_argument("--max-waiting", type=int, help="queued requests before HTTP 429 (default 256)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="text (default) or json: one JSON object per line, uvicorn's access log included")
    serve.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"],
                       help="quantize the decoder projections with bitsandbytes (default none)")
    serve.add_argument("--quantize-lm-head", action="store_true", default=None,
                       help="quantize an untied lm_head too (the embedding always stays unquantized)")
    serve.add_argument("--data-dir", type=Path, help="adapter store (default ~/.local/share/loraswap)")
    serve.add_argument("--max-cpu-loras", type=int, help="validated adapters kept in CPU memory (default 32)")
    serve.add_argument("--adapter-roots", nargs="+", type=Path, metavar="DIR",
                       help="folders the admin API may load adapters from by path")
    serve.add_argument("--admin-token", help="bearer token of the admin API (default: loopback clients only)")
    serve.add_argument("--api-key", help="bearer token required by the inference API (default: none)")
    serve.add_argument("--max-upload-mb", type=float, help="largest adapter weights accepted (default 1024)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load_settings(args.config, **fields)


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
        lambda: build_service(settings),
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
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"loraswap: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Log formatting: `--log-format text` (one readable line) or `json` (one JSON object per line).

Structured fields travel as `extra={...}` on the log call (e.g. the per-request line of
`loraswap.requests`): JSON lines carry them as top-level keys, text lines append them as
key=value, so both formats hold the same information.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`. uvicorn adds
# `color_message` (its message with ANSI colours), which is noise in both formats.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}

# uvicorn.access records carry these as positional args of "%s - \"%s %s HTTP/%s\" %d".
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status_code")


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields a log call passed with `extra=` (in the order given). Private attributes are
    not fields: Ray's record factory stamps `_ray_timestamp_ns` on every record of a process
    that imported it (serve-ray, and tests that import its parts)."""
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """timestamp (UTC, ISO 8601), level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(_ACCESS_FIELDS):
            out.update(zip(_ACCESS_FIELDS, record.args))
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)  # an extra never overwrites the fixed keys
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, then the record's extra fields as key=value (before any traceback)."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        return line + "".join(f" {key}={_text_value(value)}" for key, value in fields.items())


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    # Quote what would otherwise break key=value parsing.
    return json.dumps(text, ensure_ascii=False) if not text or any(c in text for c in ' ="\n') else text


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(level: str, log_format: LogFormat) -> None:
    """A root handler on stderr with the chosen format (a no-op if the root already has one,
    like logging.basicConfig)."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])

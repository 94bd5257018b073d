"""Logging for `jobdock serve | worker | migrate`: one JSON object per line on stderr (or
plain text for humans), uvicorn's own loggers included."""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from app.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from `extra=` and is a field
# (but uvicorn's "color_message", its message again with terminal colour codes).
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ts (ISO 8601, UTC), level, logger, message, then the
    record's `extra` fields, and `exc_info` (the traceback, as text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(settings: Settings, level: str | None = None) -> None:
    """Send every logger's records (Jobdock's, uvicorn's, the libraries') to stderr in
    `settings.log_format`, at `level` (default: `settings.log_level`).

    Replaces any handler already on the root logger, and takes uvicorn's loggers over:
    with `uvicorn.run(..., log_config=None)` they install none of their own and their
    records come here too.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True

"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``event``, fields).

Fields are whatever the caller passes; callers never pass tokens, keys or payloads.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        return json.dumps(out, default=str)


def get_logger(name: str, stream: TextIO | None = None, file: Path | None = None) -> logging.Logger:
    """A logger writing JSON lines to ``stream`` (stderr) and optionally appending to ``file``."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if file is not None:
        from hefl.net.files import private_file

        handlers.append(logging.FileHandler(private_file(file)))  # owner-only, like the state
    for h in handlers:
        h.setFormatter(JsonFormatter())
        log.addHandler(h)
    return log


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    log.log(level, name, extra={"fields": fields})

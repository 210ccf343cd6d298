"""Daemon log records as JSON lines (``shoal serve --log-format json``), for log collectors."""

from __future__ import annotations

import datetime
import json
import logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``exception``
    when there is one, and any ``extra=`` fields the call passed."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) or value is None else repr(value)
        return json.dumps(out, ensure_ascii=False)


def configure(level: int, fmt: str, as_json: bool) -> None:
    """Log to stderr at ``level``: as JSON lines, or in the text ``fmt``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])

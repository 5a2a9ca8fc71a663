"""Structured logs for the service: one line per event, plain text or JSON.

Extra fields passed with ``extra={...}`` (request_id, method, status, duration_ms, action, ...) become
JSON keys, or ``key=value`` pairs after the message in text mode, so a log line can be grepped or parsed.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from ..events import FORBIDDEN_CHARACTERS

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


# uvicorn attaches its message again with terminal colour codes; the plain message is already there.
_DROPPED = {"color_message"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value for key, value in record.__dict__.items() if key not in _STANDARD and key not in _DROPPED
    }


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extras}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...`` per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # Control characters in the message and fields escaped (a traceback keeps its lines): a
        # refused path's percent-encoded newline forged a log line of its choosing (QA round 6).
        one_line = logging.makeLogRecord(
            {**record.__dict__, "msg": _escaped(record.getMessage()), "args": None}
        )
        base = super().format(one_line)
        extras = " ".join(f"{key}={_field(value)}" for key, value in _extras(record).items())
        return f"{base} {extras}" if extras else base


def _field(value: object) -> str:
    """A field's value, quoted (logfmt's way) when it holds a blank, ``=`` or ``"``: a path with
    percent-encoded spaces (``/v1/peers/x%20client=10.9.9.9``) wrote fields of its choosing
    into the access line (QA round 68)."""
    text = _escaped(str(value))
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _escaped(text: str) -> str:
    return FORBIDDEN_CHARACTERS.sub(lambda bad: repr(bad.group())[1:-1], text)


class _AlembicContextLines(logging.Filter):
    """Drops the two lines Alembic logs whenever it opens a migration context ("Context impl ...",
    "Will assume ... DDL"): every readiness probe opens one to read the revision, so a probed
    service logged them every few seconds. Its migration lines ("Running upgrade ...") pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


def configure_logging(*, json_lines: bool, level: str) -> None:
    """Route the tracker's and uvicorn's loggers to stderr through one formatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per loaded Alembic plugin at every start is noise; its migration lines stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # httpx logs every gossip request at INFO, in its own format and without a request id; the gossip
    # agent logs what matters (failures, rejections) itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _AlembicContextLines) for f in migration.filters):
        migration.addFilter(_AlembicContextLines())
    for name in ("uvicorn", "uvicorn.error"):
        # uvicorn installs its own handlers unless told not to; ours carry the same lines.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

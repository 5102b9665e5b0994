"""Structured tunnel logs: one event per line, as logfmt-style text or as JSON.

Every record has a timestamp, a level, an ``event`` name and a message; connection records add the
per-connection ``conn`` ID.  :func:`configure_logging` installs the formatter on the *root* logger,
so the records of every other logger in the process (the QKD key pool and KME client, asyncio,
Python warnings) come out in the same format, as ``event=log`` with the ``logger`` that wrote them.
Extra fields go through :func:`safe_fields`, which keeps only plain scalars and redacts anything
that looks like key material (bytes values, or names such as ``psk``, ``secret``,
``private_key``): the session facts a channel factory reports are meant to hold suite names and
key IDs, and this is the second line of defence if one ever holds more.

Hand-written on purpose: the logging libraries (structlog, python-json-logger) format what they are
given; none refuses bytes or secret-named fields, and that refusal is the point of this module.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

__all__ = ["LOGGER_NAME", "ConnectionLog", "configure_logging", "get_logger", "new_connection_id", "safe_fields",
           "set_process_fields"]

LOGGER_NAME: Final = "hybridkex.tunnel"
REDACTED: Final = "<redacted>"

# Field names that can only hold secrets. The match is on the last word of the name, not on the
# substring "key", so facts such as "qkd_key_ids" or "key_budget" stay visible.
_SECRET_NAME = re.compile(r"(^|_)(psk|secret|password|passphrase|private|privkey|key|keys|material|token)$",
                          re.IGNORECASE)
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-\[\]]+$")


def new_connection_id() -> str:
    """A short random ID that ties together every log line of one connection."""
    return secrets.token_hex(6)


def _safe_value(value: object, depth: int = 0) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return REDACTED
    if depth < 2 and isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_safe_value(v, depth + 1) for v in items]
    if depth < 2 and isinstance(value, Mapping):
        return safe_fields(value, depth + 1)
    # Arbitrary objects could render secrets through their repr; only their type is shown.
    return f"<{type(value).__name__}>"


def safe_fields(fields: Mapping[Any, object], depth: int = 0) -> dict[str, object]:
    """Copy ``fields`` keeping plain data only and redacting names and values that may be secrets."""
    out: dict[str, object] = {}
    for name, value in fields.items():
        key = str(name)
        if _SECRET_NAME.search(key):
            out[key] = REDACTED
        else:
            out[key] = _safe_value(value, depth)
    return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


#: Fields every record of this process carries (a worker process's ``worker`` index and ``pid``).
_PROCESS_FIELDS: dict[str, object] = {}


def set_process_fields(**fields: object) -> None:
    """Add ``fields`` to every later record of this process (worker processes name themselves this way)."""
    _PROCESS_FIELDS.update(safe_fields(fields))


class _Base(logging.Formatter):
    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        raw = getattr(record, "hkx", None)
        out = safe_fields(raw) if isinstance(raw, Mapping) else {}
        for k, v in _PROCESS_FIELDS.items():
            out.setdefault(k, v)
        if record.name != LOGGER_NAME:
            out.setdefault("logger", record.name)
        if record.exc_info:  # a traceback stays inside the one line (JSON string or quoted text)
            out.setdefault("traceback", self.formatException(record.exc_info))
        return out


class JSONFormatter(_Base):
    """One JSON object per line: ts, level, event, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        for k, v in self.fields(record).items():
            doc.setdefault(k, v)
        return json.dumps(doc, separators=(",", ":"), default=str)


class TextFormatter(_Base):
    """``ts level event msg key=value ...`` with values quoted when they contain spaces."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_iso(record.created), record.levelname.lower(), str(getattr(record, "event", "log")),
                 json.dumps(record.getMessage())]
        for k, v in self.fields(record).items():
            parts.append(f"{k}={_text_value(v)}")
        return " ".join(parts)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return ",".join(_text_value(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    text = str(value)
    return text if _BARE.match(text) else json.dumps(text)


def configure_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    """Send every log record of the process to ``stream`` (stderr) in the given format; safe to call again.

    The handler sits on the root logger, so library loggers (``hybridkex.qkd.pool``,
    ``hybridkex.qkd.client``, ...) and Python warnings use the same structured format as the
    tunnel's own events; no record reaches stderr any other way.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_hybridkex", False)), None)
    if handler is None or (stream is not None and getattr(handler, "stream", None) is not stream):
        if handler is not None:
            root.removeHandler(handler)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler._hybridkex = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level.upper())
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.NOTSET)  # the root's level applies to tunnel and library records alike
    logger.propagate = True
    # warnings.warn() (e.g. SecureSiteWarning) becomes a record too.  Off first: captureWarnings(True)
    # does nothing while logging believes it still captures, even after someone (a test runner, an
    # embedding application) put warnings.showwarning back.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def log_event(level: int, event: str, msg: str, **fields: object) -> None:
    """Log one structured event (not tied to a connection)."""
    logger = get_logger()
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"event": event, "hkx": fields})


class ConnectionLog:
    """Logs the events of one connection, each carrying its ``conn`` ID and peer address."""

    __slots__ = ("conn_id", "peer_addr")

    def __init__(self, conn_id: str, peer_addr: str) -> None:
        self.conn_id = conn_id
        self.peer_addr = peer_addr

    def log(self, level: int, event: str, msg: str, **fields: object) -> None:
        logger = get_logger()
        if logger.isEnabledFor(level):
            logger.log(level, msg, extra={"event": event,
                                          "hkx": {"conn": self.conn_id, "peer_addr": self.peer_addr, **fields}})

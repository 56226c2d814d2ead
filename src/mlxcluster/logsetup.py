"""Logging set-up: text or JSON lines to stderr and optionally a file, one logger per module."""

from __future__ import annotations

import logging
import sys
import time

import msgspec

from mlxcluster.config import LoggingSection

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.role:
            entry["role"] = self.role
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


class TextFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL role logger: message``."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = f" [{role}]" if role else ""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        text = f"{stamp} {record.levelname:<7}{self.role} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(config: LoggingSection, *, role: str = "") -> None:
    """Install handlers on the root logger (replacing earlier ones) for this process's role."""
    formatter: logging.Formatter = JsonFormatter(role) if config.format == "json" else TextFormatter(role)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.file:
        handlers.append(logging.FileHandler(config.file, encoding="utf-8"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(config.level.upper())
    for noisy in ("asyncio", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

"""The log records a test's service writes, each with the request id the service's own filter gives it."""

from __future__ import annotations

import logging

from service.logs import RequestIdFilter


class Records(logging.Handler):
    """A handler on the root logger while in use; ``levels`` lowers some loggers' levels meanwhile (restored)."""

    def __init__(self, levels: dict[str, int] | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.levels = levels or {}
        self.saved: dict[str, int] = {}
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        for name, level in self.levels.items():
            self.saved[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(level)
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)

    def of(self, logger: str) -> list[logging.LogRecord]:
        """The records of ``logger`` and its children."""
        return [r for r in self.records if r.name == logger or r.name.startswith(logger + ".")]

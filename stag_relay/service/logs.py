"""structlog set-up: JSON lines for machines, readable lines for people.

Under systemd or Docker stderr is not a terminal, and the journal or the log
shipper wants one JSON object per line; on a terminal a person is reading.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    worker: int | None = None,
) -> None:
    """Route every structlog logger to ``stream`` (stderr) at ``level`` in ``fmt``.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, else JSON).
    ``worker``: this process's worker index, put in every line (workers share stderr).
    """
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_AddWorker(worker)] if worker is not None else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (PrintLogger makes two): workers share stderr, and a line
        # written in two pieces can be split by another worker's.
        logger_factory=structlog.WriteLoggerFactory(out),
        # Loggers bound per connection are short-lived; caching the first one
        # would freeze a configuration that tests reconfigure.
        cache_logger_on_first_use=False,
    )
    # Libraries we use (trio itself: accept errors, instrument failures) log through
    # the standard library.
    logging.basicConfig(level=logging.WARNING, stream=out, force=True)


class _AddWorker:
    """A processor that puts the worker index in every line."""

    def __init__(self, index: int) -> None:
        self._index = index

    def __call__(
        self, logger: object, method: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event_dict.setdefault("worker", self._index)
        return event_dict

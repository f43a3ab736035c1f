"""Structured logs: the record attributes taskq sets, and a JSON formatter.

Every log record about a job carries ``job_id``, ``task``, ``queue``,
``attempt``, ``duration`` (seconds) and ``outcome`` as attributes, so a
formatter or a log shipper can read them without parsing the message.
"""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

#: Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Format each record as one line of JSON, with its ``extra`` attributes.

    The keys are ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    then every attribute given with ``extra=`` (for taskq's job records:
    ``job_id``, ``task``, ``queue``, ``attempt``, ``duration``, ``outcome``,
    ``worker_id``), then ``exception`` with the formatted traceback if any.
    Values that are not JSON are written as their ``str()``.

    Use it with any handler::

        handler = logging.StreamHandler()
        handler.setFormatter(taskq.JsonFormatter())
        logging.getLogger("taskq").addHandler(handler)

    ``python -m taskq --log-format json ...`` sets it up for the CLI.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return orjson.dumps(entry, default=str).decode()

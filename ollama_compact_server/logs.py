"""Logging setup: plain lines or JSON lines, one configuration for the whole process."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("ocs_request", default=None)
"""What the request log line says about the HTTP request being served: its id (set by the
middleware), and the model, adapter and token counts (filled in by the chat service)."""


def request_id() -> str | None:
    info = REQUEST.get()
    return info.get("id") if info is not None else None


def note_request(
    *,
    model: str,
    adapter: str | None,
    tokens_in: int,
    tokens_out: int,
    prompt_eval_seconds: float = 0.0,
    eval_seconds: float = 0.0,
) -> None:
    """Adds one engine request's figures to the current HTTP request's log line (several
    engine requests, as with OpenAI's n, add up)."""
    info = REQUEST.get()
    if info is None:
        return
    info["model"] = model
    if adapter:
        info["adapter"] = adapter
    info["tokens_in"] = info.get("tokens_in", 0) + tokens_in
    info["tokens_out"] = info.get("tokens_out", 0) + tokens_out
    info["prompt_eval_seconds"] = info.get("prompt_eval_seconds", 0.0) + prompt_eval_seconds
    info["eval_seconds"] = info.get("eval_seconds", 0.0) + eval_seconds


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key.startswith("ocs_"):
                entry[key[4:]] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

"""Tokenizers (and a vision model's image processor) for the chat layer, loaded once per
base model (off the event loop)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..modeling.loader import load_tokenizer, load_vision
from ..registry.store import ModelRecord, Registry


class TokenizerCache:
    def __init__(self, registry: Registry, size: int = 8) -> None:
        self.registry = registry
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def __call__(self, record: ModelRecord) -> Any:
        return self._get("tokenizer", record, load_tokenizer)

    def vision(self, record: ModelRecord) -> Any:
        """The model's vision family with its image processor (modeling/vision.py); None
        for a model without the vision capability."""
        return self._get("vision", record, load_vision)

    def _get(self, kind: str, record: ModelRecord, load: Callable[..., Any]) -> Any:
        base = record
        if record.is_adapter and record.config.base_model:
            base = self.registry.get(record.config.base_model)
        key = (kind, base.digest)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load(self.registry, base)
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value

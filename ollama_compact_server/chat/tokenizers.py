"""Tokenizers for the chat layer, loaded once per base model (off the event loop)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..modeling.loader import load_tokenizer
from ..registry.store import ModelRecord, Registry


class TokenizerCache:
    def __init__(self, registry: Registry, size: int = 8) -> None:
        self.registry = registry
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[str, Any] = OrderedDict()

    def __call__(self, record: ModelRecord) -> Any:
        base = record
        if record.is_adapter and record.config.base_model:
            base = self.registry.get(record.config.base_model)
        with self.lock:
            if base.digest in self.items:
                self.items.move_to_end(base.digest)
                return self.items[base.digest]
        tokenizer = load_tokenizer(self.registry, base)
        with self.lock:
            self.items[base.digest] = tokenizer
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return tokenizer

"""Loads registry models for the device loop (transformers modules, sdpa attention)."""

from __future__ import annotations

from typing import Any

import torch

from ..modeling.loader import load_causal_lm, load_tokenizer
from ..registry.store import Registry
from .worker import LoadedModel


def stop_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in eos if isinstance(eos, list) else [eos]:
        if isinstance(value, int):
            ids.add(value)
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    return ids


class RegistryProvider:
    def __init__(self, registry: Registry, device: torch.device, dtype: torch.dtype) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype

    def __call__(self, name: str) -> LoadedModel:
        record = self.registry.get(name)
        model = load_causal_lm(self.registry, record, dtype=self.dtype)
        model.to(self.device)
        tokenizer = load_tokenizer(self.registry, record)
        return LoadedModel(model=model, tokenizer=tokenizer, stop_ids=stop_ids_of(model, tokenizer))

"""What the engine tells apart about faults: out of memory (handled by stepping back) and
the one-line texts a failed request's error event carries."""

from __future__ import annotations

import torch

from ..modeling.lora import LoraError


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def adapter_error(exc: BaseException) -> str:
    if isinstance(exc, LoraError):
        return str(exc)
    return error_text("placing the adapter on the device failed", exc)


def error_text(what: str, exc: BaseException) -> str:
    if is_oom(exc):
        return f"{what}: out of memory"
    return f"{what}: {exc.__class__.__name__}"

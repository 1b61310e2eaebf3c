"""Calibration: the packaged public-domain text, tokenized into a few windows, run through
the parent model to record each linear layer's input energy per channel (sum of x_j^2)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
from torch import nn

CALIBRATION_FILE = "calibration.txt"


def calibration_text() -> str:
    return (resources.files("ollama_compact_server") / "data" / CALIBRATION_FILE).read_text(
        encoding="utf-8"
    )


def calibration_windows(tokenizer: Any, tokens: int, window: int = 256) -> list[torch.Tensor]:
    """Up to ``tokens`` tokens of calibration text as [1, window] id tensors."""
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    windows = []
    for start in range(0, min(len(ids), tokens), window - 1):
        chunk = ids[start : start + window - 1]
        if len(chunk) < 8:
            break
        if isinstance(bos, int):
            chunk = [bos, *chunk]
        windows.append(torch.tensor([chunk]))
    return windows


@torch.no_grad()
def input_energy(
    model: nn.Module,
    windows: list[torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    hessian_for: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Module name -> sum over calibration tokens of x_j^2 for each input channel j. Modules
    named in ``hessian_for`` also accumulate X^T X into ``hessians``."""
    energy: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # x: [T, K]
            total = (x * x).sum(dim=0)
            energy[name] = energy[name] + total if name in energy else total
            if hessians is not None and name in hessian_for:
                gram = x.t() @ x  # [K, K]
                hessians[name] = hessians[name] + gram if name in hessians else gram

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        for i, ids in enumerate(windows):
            model(input_ids=ids, use_cache=False)
            if progress is not None:
                progress(i + 1, len(windows))
    finally:
        for handle in hooks:
            handle.remove()
    return energy

"""Calibration: the packaged public-domain text, tokenized into a few windows, run through
the parent model to record each linear layer's input energy per channel (sum of x_j^2) and,
for bit allocation, the loss's sensitivity to each weight (the Fisher diagonal)."""

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


def fisher_diagonal(
    model: nn.Module,
    windows: list[torch.Tensor],
    weights: dict[str, torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Name -> sum over calibration windows of the squared gradient of the language-model
    loss with respect to each weight in ``weights`` (the empirical Fisher diagonal, as in
    HAWQ-V2 and SqueezeLLM). ``sum(F * dW**2)`` then estimates how much a perturbation dW of
    that weight raises the loss, through every later layer, which a per-layer output error
    cannot see. A tied embedding table gets the gradient of both its uses. Each gradient is
    folded into its sum as soon as it is computed and dropped, so memory holds the model,
    one sum per weight and one window's activations."""
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    by_param = {id(w): name for name, w in weights.items()}
    hooks = []
    flags = {id(p): p.requires_grad for p in model.parameters()}

    def fold(param: torch.Tensor) -> None:
        if param.grad is not None:
            name = by_param.get(id(param))
            if name is not None:
                sums[name].add_(param.grad.detach().float() ** 2)
            param.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in by_param)
            if id(p) in by_param:
                hooks.append(p.register_post_accumulate_grad_hook(fold))
        for i, ids in enumerate(windows):
            with torch.enable_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
            if progress is not None:
                progress(i + 1, len(windows))
    finally:
        for handle in hooks:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    return sums

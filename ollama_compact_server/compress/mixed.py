"""Mixed precision: which modules stay int4 and which become int8, chosen by how much each
one's quantization error falls per extra byte, for a target size."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import quant
from .format import ModuleSpec

if TYPE_CHECKING:
    from .pipeline import Progress, Target


def error(
    target: Target,
    tensors: dict,
    kind: str,
    energy: torch.Tensor | None,
    fisher: torch.Tensor | None = None,
) -> float:
    """How much quantizing ``target`` costs: with the Fisher diagonal, the estimated rise of
    the loss, sum F * dW^2; without it, the layer's activation-weighted output error,
    sum_j E[x_j^2] ||dW_j||^2."""
    n = target.weight.shape[0]
    deq = quant.dequantize_int8(tensors) if kind == "int8" else quant.dequantize_int4(tensors, n)
    diff = (deq - target.weight.detach().float()) ** 2  # [N, K]
    if fisher is not None:
        return float((diff * fisher).sum())
    col = diff.sum(dim=0)
    return float((col * energy).sum() if energy is not None else col.sum())


def mixed_plan(
    targets: list[Target],
    group: int,
    ratio: float,
    energy_of: Callable[[Target], torch.Tensor | None],
    progress: Progress,
    fisher: dict[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """int4 everywhere, then int8 for the modules whose error falls most per extra byte,
    while the whole model stays under ``ratio`` of its float32 size. The error is the
    Fisher-weighted one where ``fisher`` has the module, else the per-layer output error
    (gemma3:270m at 18% of float32 with GPTQ: perplexity +8.7% when the Fisher diagonal
    chose, +12.4% when the per-layer output error did; docs/PERFORMANCE.md)."""
    fisher = fisher or {}
    budget = ratio * 32 * sum(t.weight.numel() for t in targets)
    kinds = {t.name: "int4" for t in targets}
    gains = []
    for i, t in enumerate(targets):
        progress(f"measuring sensitivity of {t.name}", i, len(targets))
        e = energy_of(t)
        f = fisher.get(t.name)
        err4 = error(t, quant.quantize_int4(t.weight, group, e), "int4", e, f)
        err8 = error(t, quant.quantize_int8(t.weight), "int8", e, f)
        n, k = t.weight.shape
        cost4 = ModuleSpec("int4", k, n, group_size=group).bits_per_weight() * n * k
        cost8 = ModuleSpec("int8", k, n).bits_per_weight() * n * k
        gains.append(((err4 - err8) / (cost8 - cost4), cost8 - cost4, t.name))
    used = sum(
        ModuleSpec("int4", t.weight.shape[1], t.weight.shape[0], group_size=group).bits_per_weight()
        * t.weight.numel()
        for t in targets
    )
    for _, extra, name in sorted(gains, reverse=True):
        if used + extra <= budget:
            kinds[name] = "int8"
            used += extra
    return kinds

"""Pruning: magnitude or activation-aware (Wanda: |W| x ||X||), unstructured per output row or
2:4 (two of every four consecutive input weights kept). Returns the weight with zeros."""

from __future__ import annotations

import torch


def score(weight: torch.Tensor, method: str, act_norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of every weight: |W|, or |W| * ||X_j|| (Wanda) when activations are known."""
    s = weight.detach().float().abs()
    if method == "wanda" and act_norm is not None:
        s = s * act_norm.float().sqrt()[None, :]  # act_norm holds sum x_j^2 per input channel
    return s


def prune(
    weight: torch.Tensor,
    method: str,
    pattern: str,
    sparsity: float,
    act_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    w = weight.detach().float()
    s = score(w, method, act_norm)
    n, k = w.shape
    if pattern == "2:4":
        groups = s.reshape(n, k // 4, 4)
        drop = groups.argsort(dim=-1)[..., :2]  # the two least important of each four
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return (w.reshape(n, k // 4, 4) * mask).reshape(n, k)
    drop_count = int(k * sparsity)
    if drop_count <= 0:
        return w
    drop = s.argsort(dim=1)[:, :drop_count]  # per output row, as Wanda compares
    return w.scatter(1, drop, 0.0)

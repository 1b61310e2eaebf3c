"""GPTQ (Frantar et al., 2022): quantizes a linear layer column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of
the layer's calibration inputs (H = X^T X), so the layer's *output* error stays small.
Group-wise asymmetric scales are chosen when a group starts, on the updated weights."""

from __future__ import annotations

import torch

from .quant import group_params


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> codes int32 [N, K], scale / zero [N, K/G]
    (w ~ (q - levels // 2) * scale + zero, as :func:`quant.group_params`)."""
    w = weight.detach().float().clone()  # [N, K]
    n, k = w.shape
    mid = levels // 2
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads to later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    diag = torch.diag(hessian).float()
    block = max(block, group_size)
    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        s = z = torch.zeros(n)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                _, sg, zg = group_params(
                    w1[:, i : i + group_size], levels, group_size, diag[col : col + group_size]
                )
                s, z = sg[:, 0], zg[:, 0]
                scales[:, g], zeros[:, g] = s, z
            q = torch.clamp(torch.round((w1[:, i] - z) / s) + mid, 0, levels - 1)
            codes[:, col] = q.to(torch.int32)
            deq = (q - mid) * s + z
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros

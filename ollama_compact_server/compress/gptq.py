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
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> codes int32 [N, K], scale / zero [N, K/G]
    (w ~ (q - levels // 2) * scale + zero, as :func:`quant.group_params`).

    ``act_order`` quantizes columns by decreasing input energy with "static groups": group
    scales are fitted on the original weights first, so groups stay contiguous in storage."""
    if act_order:
        return _gptq_act_order(weight, hessian, levels, group_size, damp, block)
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


def _inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return hinv.float(), dead


def _gptq_act_order(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: int,
    group_size: int,
    damp: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight.detach().float().clone()  # [N, K]
    n, k = w.shape
    mid = levels // 2
    diag = torch.diag(hessian).float()
    _, scales, zeros = group_params(w, levels, group_size, diag)  # static groups: [N, K/G]
    perm = torch.argsort(diag, descending=True)
    hinv, dead = _inverse_factor(hessian[perm][:, perm], damp)
    w = w[:, perm]
    w[:, dead] = 0.0
    group_of = perm // group_size  # [K]: group of each permuted column
    s_cols = scales[:, group_of]  # [N, K]
    z_cols = zeros[:, group_of]
    codes = torch.zeros(n, k, dtype=torch.int32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s, z = s_cols[:, col], z_cols[:, col]
            q = torch.clamp(torch.round((w1[:, i] - z) / s) + mid, 0, levels - 1)
            codes[:, perm[col]] = q.to(torch.int32)
            e = (w1[:, i] - ((q - mid) * s + z)) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros

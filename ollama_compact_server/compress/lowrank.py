"""Low-rank factorisation of a linear layer by truncated SVD: W [N, K] ~ U [N, r] @ V [r, K]."""

from __future__ import annotations

import torch


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """The smallest rank keeping ``energy`` of the squared singular values."""
    power = singular.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp(min=1e-30)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1


def factor(weight: torch.Tensor, rank: int | None, energy: float | None) -> dict[str, torch.Tensor]:
    """U and V (float32) with U @ V the best rank-r approximation of ``weight``."""
    w = weight.detach().float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = rank if rank is not None else rank_for_energy(s, energy if energy is not None else 0.9)
    r = max(1, min(r, s.shape[0]))
    root = s[:r].sqrt()
    return {
        "u": (u[:, :r] * root).contiguous(),
        "v": (root[:, None] * vh[:r]).contiguous(),
    }


def saves_space(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features

"""DoRA's and IA3's per-row vectors for the adapter slots of one model: every wrapped
projection's vectors side by side in one ``[slots + 1, width]`` store, gathered once per
forward by each row's slot (rows without such an adapter read the last row, the identity),
and DoRA's per-output factor, computed from the base's weight when an adapter is placed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHUNK = 1024  # weight rows (or columns) read at a time for DoRA's norms


class VectorStore:
    """Only the engine thread changes it, between forwards. Scales are 1 and shifts 0 in
    the identity row and in the columns a slot's adapter does not use."""

    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.slots = slots
        self.dtype = dtype
        self.device = device
        self.store: torch.Tensor | None = None  # [slots + 1, width]
        self.identity: torch.Tensor | None = None  # [width]
        self.width = 0

    def reserve(self, spans: list[tuple[int, float]]) -> list[int]:
        """Columns for new vectors, given as (width, identity value): the store grows once,
        keeping what its slots hold; returns each new vector's first column."""
        fills = torch.cat(
            [
                torch.full((width,), fill, dtype=self.dtype, device=self.device)
                for width, fill in spans
            ]
        )
        identity = fills if self.identity is None else torch.cat([self.identity, fills])
        store = identity.expand(self.slots + 1, -1).clone()
        if self.store is not None:
            store[:, : self.width] = self.store
        starts = []
        at = self.width
        for width, _ in spans:
            starts.append(at)
            at += width
        self.store, self.identity, self.width = store, identity, int(identity.numel())
        return starts

    def write(self, slot: int, columns: dict[int, torch.Tensor]) -> None:
        """Slot ``slot`` holds ``columns`` ({first column: vector}), the identity elsewhere."""
        if self.store is None or self.identity is None:
            return
        row = self.identity.clone()
        for at, vector in columns.items():
            row[at : at + vector.numel()] = vector.to(self.dtype)
        self.store[slot] = row

    def gather(self, slots: list[int]) -> torch.Tensor | None:
        """Each row's vectors [B, width] (slot -1: the identity)."""
        if self.store is None:
            return None
        index = torch.tensor([s if s >= 0 else self.slots for s in slots], dtype=torch.long)
        return self.store.index_select(0, index.to(self.device))

    @property
    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.numel() * self.store.element_size()


def dora_norms(
    module: Any, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """||W + scale B A||_row in float32 [out], W the weight ``module`` computes with: a dense
    module's own, a compressed module's dequantized rows, or (a module that keeps only its
    kernel's layout, such as int4 repacked for CUDA) its columns read back through its
    forward on unit vectors in ``dtype``. ``a`` [r, in], ``b`` [out, r] in float32."""
    out_f = int(module.out_features)
    if isinstance(module, nn.Linear) or getattr(module, "rows", None) is not None:
        norms = torch.empty(out_f, dtype=torch.float32, device=a.device)
        try:
            for start in range(0, out_f, CHUNK):
                stop = min(start + CHUNK, out_f)
                weight = _weight_rows(module, start, stop).to(a.device)  # [rows, in]
                weight = weight + scale * (b[start:stop] @ a)
                norms[start:stop] = torch.linalg.norm(weight, dim=1)
            return norms
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            # no stored layout to read rows from: read columns through the forward
    in_f = int(module.in_features)
    bias = getattr(module, "bias", None)
    squares = torch.zeros(out_f, dtype=torch.float32, device=a.device)
    for start in range(0, in_f, CHUNK):
        stop = min(start + CHUNK, in_f)
        units = torch.zeros((stop - start, in_f), dtype=dtype, device=a.device)
        units[:, start:stop].fill_diagonal_(1.0)
        columns = type(module).forward(module, units).float()  # [cols, out] = W[:, cols]^T
        if bias is not None:
            columns = columns - bias.float()
        columns = columns + scale * (a[:, start:stop].t() @ b.t())
        squares += columns.square().sum(dim=0)
    return squares.sqrt()


def _weight_rows(module: Any, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the weight in float32 (a compressed module's dequantized rows)."""
    if isinstance(module, nn.Linear):
        return module.weight[start:stop].float()
    # an int4 module whose CPU kernel layout replaced its stored one rebuilds that to read
    # rows; it is released again after, not kept beside the kernel's copy
    released = getattr(module, "qweight", False) is None
    device = getattr(module, "device", None)
    try:
        ids = torch.arange(start, stop, device=device if device is not None else "cpu")
        return module.rows(ids, torch.float32).float()
    finally:
        if released:
            module.qweight = None

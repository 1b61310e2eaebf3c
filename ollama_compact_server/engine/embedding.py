"""Embeddings on the device thread: a decoder's last hidden states mean-pooled, or an
encoder's token states pooled as its sentence-transformers config says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

EMBED_BATCH = 16


def right_padded(
    batch: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as right-padded ids and their attention mask, both [B, T]."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def embed(
    model: Any,
    inputs: list[list[int]],
    device: torch.device,
    select: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Mean of the last hidden states over each input's tokens, L2-normalised; inputs are
    right-padded in batches and masked. ``select(rows)`` runs before each batch's forward
    (it points a LoRA bank's rows at an adapter)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    vectors: list[list[float]] = []
    for start in range(0, len(inputs), EMBED_BATCH):
        batch = inputs[start : start + EMBED_BATCH]
        ids, mask = right_padded(batch, 0, device)
        if select is not None:
            select(len(batch))
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # hidden: [B, T, H]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        vectors.extend(pooled.cpu().tolist())
    return vectors


@torch.inference_mode()
def embed_encoder(
    model: Any, inputs: list[list[int]], device: torch.device, pooling: str
) -> list[list[float]]:
    """Embeddings from an encoder: its token states pooled as its sentence-transformers
    config says (mean, cls, max, lasttoken), L2-normalised; right-padded and masked."""
    vectors: list[list[float]] = []
    pad = getattr(model.config, "pad_token_id", None) or 0
    for start in range(0, len(inputs), EMBED_BATCH):
        batch = inputs[start : start + EMBED_BATCH]
        ids, mask = right_padded(batch, pad, device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [B, T, H]
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "lasttoken":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(len(batch), device=device), last]
        elif pooling == "max":
            pooled = hidden.masked_fill(keep == 0, float("-inf")).max(dim=1).values
        else:
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        vectors.extend(pooled.cpu().tolist())
    return vectors

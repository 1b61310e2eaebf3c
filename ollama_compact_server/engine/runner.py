"""Runs one model's forward passes over the slot KV cache: a decode step for many rows, or
a prefill chunk of one sequence. The families modeling/compact.py covers run its compact
forward (same numerics as transformers, far fewer operations); others run the model's own
transformers modules. Either way the cache and the masks are ours."""

from __future__ import annotations

from typing import Any

import torch

from ..modeling.compact import CompactModel, compact_for
from ..modeling.lora import LoraBank
from .kv import KVShape, SlotKVCache

# architectures whose every layer attends within config.sliding_window when it is set
# (transformers' Mistral and Phi-3 masks); others name their sliding layers in layer_types
WINDOWED_FAMILIES = ("mistral", "phi3")


def kv_shape(config: Any) -> KVShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(
        config.num_hidden_layers, getattr(config, "num_key_value_heads", heads), head_dim
    )


class ModelRunner:
    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        compact: bool = True,
    ) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.lora: LoraBank | None = None  # adapter slots, made on the first adapter request
        self.cache = SlotKVCache(kv_shape(self.config), slots, capacity, dtype, device)
        layer_types = list(getattr(self.config, "layer_types", None) or [])
        self.window: int | None = None
        if "sliding_attention" in layer_types and getattr(self.config, "sliding_window", None):
            self.window = int(self.config.sliding_window)
        # Models that take a dict of prepared masks per layer type (gemma3, qwen2, ...)
        self.mask_dict = bool(layer_types)
        family = getattr(self.config, "model_type", "")
        if not layer_types and family in WINDOWED_FAMILIES:
            window = getattr(self.config, "sliding_window", None)
            self.window = int(window) if window else None
        self.compact: CompactModel | None = compact_for(model) if compact else None

    def attach_lora(self, slots: int) -> LoraBank:
        """The model's LoRA bank with ``slots`` adapter slots (made once)."""
        if self.lora is None:
            self.lora = LoraBank(self.model, slots, self.dtype, self.device)
            if self.compact is not None:
                self.compact.lora = self.lora
        return self.lora

    def _masks(self, positions: torch.Tensor, length: int) -> Any:
        # positions: [B, q] -> bool masks [B, 1, q, length]; True = attend
        keys = torch.arange(length, device=self.device).view(1, 1, 1, length)
        query = positions.view(positions.shape[0], 1, positions.shape[1], 1)
        full = keys <= query
        if not self.mask_dict:
            if self.window is not None:  # every layer slides (Mistral, Phi-3)
                return self._windowed(full, keys, query, positions)
            return full
        masks = {"full_attention": full}
        if self.window is not None:
            masks["sliding_attention"] = self._windowed(full, keys, query, positions)
        else:
            masks["sliding_attention"] = full
        return masks

    def _windowed(
        self, full: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        sliding = full & (query - keys < int(self.window or 0))
        if positions.shape[1] > 1:
            # pad columns of a batched prefill sit at the last position; give them key 0
            # so no row of the mask is empty (an empty row makes attention NaN)
            pad = query == self.cache.capacity - 1
            sliding = sliding | (pad & (keys == 0))
        return sliding

    @torch.inference_mode()
    def forward(
        self,
        slots: list[int],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        keep: int = 1,
        loras: list[int] | None = None,
        step: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions: [B, q]; attends over ``length`` cached positions; returns
        the last column's logits [B, V]. ``loras``: each row's adapter slot (-1: none);
        ``step``: a decode step (see CompactModel.forward)."""
        self.cache.bind(slots, positions, length)
        if self.lora is not None:
            self.lora.select(loras)
        try:
            if self.compact is not None:
                logits = self.compact.forward(
                    input_ids,
                    positions,
                    self._masks(positions, length),
                    self.cache,
                    keep,
                    step=step,
                )
                return logits[:, -1, :] if keep == 1 else logits
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=self._masks(positions, length),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        finally:
            if self.lora is not None:
                self.lora.reset()
        return out.logits[:, -1, :] if keep == 1 else out.logits

    def decode(
        self,
        slots: list[int],
        tokens: list[int],
        positions: list[int],
        loras: list[int] | None = None,
    ) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(-1, 1)
        return self.forward(slots, ids, pos, max(positions) + 1, loras=loras, step=True)

    def prefill(
        self,
        slot: int,
        tokens: list[int],
        start: int,
        all_logits: bool = False,
        lora: int = -1,
    ) -> torch.Tensor:
        """A chunk of one sequence's prompt, written at positions start.. ; returns the last
        position's logits [1, V], or every position's [q, V] with ``all_logits``."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
        pos = torch.arange(start, start + len(tokens), device=self.device).view(1, -1)
        length = start + len(tokens)
        if all_logits:
            return self.forward([slot], ids, pos, length, keep=0, loras=[lora])[0]
        return self.forward([slot], ids, pos, length, loras=[lora])

    def prefill_batch(
        self,
        slots: list[int],
        prompts: list[list[int]],
        loras: list[int] | None = None,
        starts: list[int] | None = None,
    ) -> torch.Tensor:
        """Prompts of several sequences in one forward, left-padded so every row's last
        column is its last prompt token; row i's tokens go at positions starts[i].. (0: a
        fresh prompt; more: the rest of a prompt whose beginning was already cached). Pad
        columns get the position ``capacity - 1``: their cache writes land where no real
        query looks (that position is rewritten before any sequence can attend to it) and
        their outputs are unused."""
        starts = starts or [0] * len(prompts)
        if len(prompts) == 1:
            return self.prefill(slots[0], prompts[0], starts[0], lora=loras[0] if loras else -1)
        width = max(len(p) for p in prompts)
        junk = self.cache.capacity - 1
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        pos = torch.full((len(prompts), width), junk, dtype=torch.long)
        for row, (prompt, start) in enumerate(zip(prompts, starts)):
            pad = width - len(prompt)
            ids[row, pad:] = torch.tensor(prompt, dtype=torch.long)
            pos[row, pad:] = torch.arange(start, start + len(prompt))
        length = max(start + len(p) for p, start in zip(prompts, starts))
        return self.forward(slots, ids.to(self.device), pos.to(self.device), length, loras=loras)

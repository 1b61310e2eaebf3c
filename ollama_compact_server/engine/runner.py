"""Runs one model's forward passes over the slot KV cache: a decode step for many rows, or
a prefill chunk of one sequence. The families modeling/compact.py covers run its compact
forward (same numerics as transformers, far fewer operations); others run the model's own
transformers modules. Either way the cache and the masks are ours."""

from __future__ import annotations

from typing import Any

import torch

from ..modeling.compact import CompactModel, compact_for
from ..modeling.lora import LoraBank
from ..modeling.vision import VisionFamily, text_config, vision_family
from .kv import KVShape, SlotKVCache
from .sequence import Media, image_key
from .types import ImageInput

Blocks = list[list[tuple[int, int]]]
"""Each row's spans of positions (start, end) whose tokens attend to each other both ways."""

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
        self.config = text_config(model.config)  # the language model's
        architectures = list(getattr(model.config, "architectures", None) or [""])
        self.vision: VisionFamily | None = (
            vision_family(architectures[0], model.config)
            if hasattr(model.config, "vision_config")
            else None
        )
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

    def _masks(self, positions: torch.Tensor, length: int, blocks: Blocks | None = None) -> Any:
        # positions: [B, q] -> bool masks [B, 1, q, length]; True = attend
        keys = torch.arange(length, device=self.device).view(1, 1, 1, length)
        query = positions.view(positions.shape[0], 1, positions.shape[1], 1)
        full = keys <= query
        for row, spans in enumerate(blocks or []):
            for start, end in spans:  # an image's tokens see each other both ways
                inside = (query[row] >= start) & (query[row] < end)  # [1, q, 1]
                full[row] |= inside & (keys[0] >= start) & (keys[0] < end)
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
        embeds: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
        blocks: Blocks | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, q]; attends over ``length`` cached positions; returns
        the last column's logits [B, V]. ``loras``: each row's adapter slot (-1: none);
        ``step``: a decode step (see CompactModel.forward). A prompt with images comes as
        ``embeds`` [B, q, hidden] (its images' embeddings in place), and for an M-RoPE model
        with its rotary positions ``rope`` ([3, B, q] or [B, q]; ``positions`` stay the cache's)
        and, where images attend both ways, each row's image spans ``blocks``."""
        self.cache.bind(slots, positions, length)
        if self.lora is not None:
            self.lora.select(loras)
        try:
            if self.compact is not None and rope is None:
                logits = self.compact.forward(
                    input_ids,
                    positions,
                    self._masks(positions, length, blocks),
                    self.cache,
                    keep,
                    step=step,
                    embeds=embeds,
                )
                return logits[:, -1, :] if keep == 1 else logits
            out = self.model(
                input_ids=input_ids if embeds is None else None,
                inputs_embeds=embeds,
                position_ids=positions if rope is None else rope,
                attention_mask=self._masks(positions, length, blocks),
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
        offsets: list[int] | None = None,
    ) -> torch.Tensor:
        """One token per row at its position; ``offsets``: an M-RoPE model's rotary offset
        per row (a prompt with images moves every later position; none: all 0)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(-1, 1)
        rope = None
        if offsets is not None and any(offsets):
            rope = pos + torch.tensor(offsets, dtype=torch.long, device=self.device).view(-1, 1)
        return self.forward(
            slots, ids, pos, max(positions) + 1, loras=loras, step=rope is None, rope=rope
        )

    def prefill(
        self,
        slot: int,
        tokens: list[int],
        start: int,
        all_logits: bool = False,
        lora: int = -1,
        media: Media | None = None,
    ) -> torch.Tensor:
        """A chunk of one sequence's prompt, written at positions start.. ; returns the last
        position's logits [1, V], or every position's [q, V] with ``all_logits``."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
        pos = torch.arange(start, start + len(tokens), device=self.device).view(1, -1)
        length = start + len(tokens)
        embeds, rope, blocks = self._media(ids, [start], [media]) if media else (None, None, None)
        keep = 0 if all_logits else 1
        logits = self.forward(
            [slot], ids, pos, length, keep, [lora], embeds=embeds, rope=rope, blocks=blocks
        )
        return logits[0] if all_logits else logits

    def prefill_batch(
        self,
        slots: list[int],
        prompts: list[list[int]],
        loras: list[int] | None = None,
        starts: list[int] | None = None,
        media: list[Media | None] | None = None,
    ) -> torch.Tensor:
        """Prompts of several sequences in one forward, left-padded so every row's last
        column is its last prompt token; row i's tokens go at positions starts[i].. (0: a
        fresh prompt; more: the rest of a prompt whose beginning was already cached). Pad
        columns get the position ``capacity - 1``: their cache writes land where no real
        query looks (that position is rewritten before any sequence can attend to it) and
        their outputs are unused. ``media``: each row's images (None: text only)."""
        starts = starts or [0] * len(prompts)
        media = media or [None] * len(prompts)
        if len(prompts) == 1:
            return self.prefill(
                slots[0], prompts[0], starts[0], lora=loras[0] if loras else -1, media=media[0]
            )
        width = max(len(p) for p in prompts)
        junk = self.cache.capacity - 1
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        pos = torch.full((len(prompts), width), junk, dtype=torch.long)
        for row, (prompt, start) in enumerate(zip(prompts, starts)):
            pad = width - len(prompt)
            ids[row, pad:] = torch.tensor(prompt, dtype=torch.long)
            pos[row, pad:] = torch.arange(start, start + len(prompt))
        length = max(start + len(p) for p, start in zip(prompts, starts))
        ids, pos = ids.to(self.device), pos.to(self.device)
        embeds, rope, blocks = None, None, None
        if any(m is not None for m in media):
            # a row's first column sits at its start, whatever its left padding
            firsts = [start - (width - len(p)) for p, start in zip(prompts, starts)]
            embeds, rope, blocks = self._media(ids, firsts, media)
        return self.forward(
            slots, ids, pos, length, loras=loras, embeds=embeds, rope=rope, blocks=blocks
        )

    # ------------------------------------------------------------ images

    def _media(
        self, ids: torch.Tensor, firsts: list[int], media: list[Media | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None, Blocks | None]:
        """Input embeddings for ids [B, q] with the images' embeddings in place, for an
        M-RoPE model the rotary positions [3, B, q], and where an image's tokens attend to
        each other both ways each row's image spans; row i's column c is prompt position
        firsts[i] + c (columns before 0 are padding)."""
        vision = self.vision
        if vision is None:
            raise ValueError("this model does not take images")
        self._encode([m for m in media if m is not None and m.features is None])
        embeds = self.model.get_input_embeddings()(ids)  # [B, q, hidden]
        width = ids.shape[1]
        rope = None
        if vision.mrope:
            columns = torch.arange(width, device=self.device)
            rope = (torch.tensor(firsts, device=self.device).view(-1, 1) + columns).clamp(min=0)
            rope = rope.unsqueeze(0).repeat(3, 1, 1)  # [3, B, q]
        for row, item in enumerate(media):
            if item is None:
                continue
            first = firsts[row]
            for image, features in zip(item.images, item.features or []):
                # the columns of this row that hold the image's positions
                low = max(image.start, first)
                high = min(image.start + image.length, first + width)
                if low < high:
                    rows = features[low - image.start : high - image.start]
                    embeds[row, low - first : high - first] = rows.to(embeds.dtype)
            if rope is not None and item.rope is not None:
                prompt = item.rope.shape[1]
                low, high = max(first, 0), first + width
                inside = min(high, prompt)
                if low < inside:
                    rope[:, row, low - first : inside - first] = item.rope[:, low:inside]
                if high > max(prompt, low):  # generated tokens, fed again after a preemption
                    start = max(prompt, low)
                    rope[:, row, start - first :] += item.delta
        blocks = None
        if vision.bidirectional:
            blocks = [
                [(i.start, i.start + i.length) for i in item.images] if item else []
                for item in media
            ]
        return embeds, rope, blocks

    def _encode(self, waiting: list[Media]) -> None:
        """The embeddings of every image of these prompts, one encoder pass for all."""
        vision = self.vision
        if not waiting or vision is None:
            return
        images = [image for item in waiting for image in item.images]
        with torch.inference_mode():
            features = vision.encode(self.model, [image.pixels for image in images])
        for image, made in zip(images, features, strict=True):
            if made.shape[0] != image.length:
                raise ValueError(
                    f"an image gave {made.shape[0]} embeddings for {image.length} positions"
                )
        at = 0
        for item in waiting:
            item.features = features[at : at + len(item.images)]
            at += len(item.images)

    def media_for(self, prompt: list[int], images: list[ImageInput]) -> Media:
        """A prompt's images checked against its placeholders, with the cache's key and an
        M-RoPE model's positions. Raises ValueError for a prompt that does not match."""
        vision = self.vision
        if vision is None:
            raise ValueError("this model does not take images")
        end = 0
        for image in images:
            span = prompt[image.start : image.start + image.length]
            if image.start < end or image.length < 1 or len(span) != image.length:
                raise ValueError("an image's placeholder positions are out of order or range")
            if any(token != vision.image_token for token in span):
                raise ValueError("an image's positions do not hold its placeholder tokens")
            end = image.start + image.length
        if sum(image.length for image in images) != prompt.count(vision.image_token):
            raise ValueError("the prompt has image placeholders without an image")
        media = Media(images, image_key(prompt, images))
        if vision.mrope:
            grids = [image.pixels["image_grid_thw"] for image in images]
            rope, media.delta = vision.positions(self.model, prompt, grids)
            media.rope = rope.to(self.device)
        return media

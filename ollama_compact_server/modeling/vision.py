"""Vision-language families: what each needs to turn a decoded picture into the tensors its
vision encoder takes and a count of image tokens (off the device thread, in the chat layer),
and, on the device, the encoder run over several images at once and the positions its
language model rotates by. The language model itself runs as any other (runner.py).

A family is chosen from the model's recorded architecture, never guessed:

- Qwen2-VL and Qwen2.5-VL: patches merged 2x2, 3-D rotary positions;
- LLaVA 1.5: a CLIP tower and a projector, a fixed number of tokens per image;
- LLaVA-NeXT: crops at the grid resolution that fits the picture best, packed;
- Gemma 3: a SigLIP tower pooled to a fixed number of tokens that attend both ways;
- Idefics3 and SmolVLM: tiles of the picture and the whole, each a run of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry.importers import VISION_ARCHITECTURES


@dataclass(slots=True)
class Prepared:
    """One run of a picture's tokens made ready for a family's encoder (on the CPU, off the
    event loop): the whole picture for most families, one tile of it for Idefics3."""

    pixels: dict[str, torch.Tensor]  # the processor's tensors for this run alone
    length: int  # image tokens it fills in the prompt
    grid: tuple[int, int] = (0, 0)  # a tiled picture's rows and columns (on its first run)


class VisionFamily:
    """What the engine and the chat layer need from one vision-language family."""

    mrope = False  # rotary positions are [3, L] (temporal, height, width), not [L]
    bidirectional = False  # an image's tokens attend to each other both ways (one forward)

    def __init__(self, config: Any, processor: Any = None) -> None:
        self.config = config
        self.processor = processor  # the image processor (chat layer side only)
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        if token is None:
            raise ValueError("the model's config names no image token")
        self.image_token = int(token)

    def prepare(self, processor: Any, image: Any) -> list[Prepared]:
        """The picture's runs of image tokens, in prompt order."""
        return [self.whole(processor, image)]

    def whole(self, processor: Any, image: Any) -> Prepared:  # pragma: no cover - abstract
        raise NotImplementedError

    def placeholder(self, tokenizer: Any) -> str:
        """The token text the chat template writes for an image."""
        return str(tokenizer.convert_ids_to_tokens(self.image_token))

    def expansion(self, tokenizer: Any, runs: list[Prepared]) -> str:
        """What the processor puts in its place: the image's tokens (and for some
        families text around them)."""
        return str(tokenizer.convert_ids_to_tokens(self.image_token)) * runs[0].length

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each image's embeddings [length, hidden], one encoder pass for all of them."""
        raise NotImplementedError  # pragma: no cover - abstract

    def positions(self, model: Any, ids: list[int], grids: list[Any]) -> tuple[torch.Tensor, int]:
        """A prompt's rotary positions [3, L] and the offset of every later position (its
        text index plus the offset); only for families with ``mrope``."""
        raise NotImplementedError  # pragma: no cover - abstract


def backbone(model: Any) -> Any:
    """The transformers model under peft's wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Qwen2VL(VisionFamily):
    """Qwen2-VL / Qwen2.5-VL: the processor cuts an image into 14-pixel patches (two
    frames deep), the tower merges each 2x2 group into one token."""

    mrope = True

    def whole(self, processor: Any, image: Any) -> Prepared:
        out = processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]  # [1, 3]
        merge = int(self.config.vision_config.spatial_merge_size)
        length = int(grid.prod()) // (merge * merge)
        return Prepared({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, length)

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        inner = backbone(model).model
        pixels = torch.cat([i["pixel_values"] for i in images])
        grids = torch.cat([i["image_grid_thw"] for i in images])
        out = inner.get_image_features(
            pixels.to(inner.visual.device), grids.to(inner.visual.device), return_dict=True
        )
        return list(out.pooler_output)

    def positions(self, model: Any, ids: list[int], grids: list[Any]) -> tuple[torch.Tensor, int]:
        inner = backbone(model).model
        tokens = torch.tensor([ids], dtype=torch.long)
        types = (tokens == self.image_token).int()
        grid = torch.cat(grids) if grids else None
        positions, delta = inner.get_rope_index(tokens, types, image_grid_thw=grid)
        return positions[:, 0, :], int(delta.view(-1)[0])


class Llava(VisionFamily):
    """LLaVA 1.5: a CLIP tower over a fixed-size crop, a projector into the language
    model; one token per patch (and the CLS token with the "full" strategy)."""

    def whole(self, processor: Any, image: Any) -> Prepared:
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        patch = int(self.config.vision_config.patch_size)
        length = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        if self.config.vision_feature_select_strategy == "full":
            length += 1
        return Prepared({"pixel_values": pixels}, length)

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        inner = backbone(model).model
        device = inner.multi_modal_projector.linear_1.weight.device
        dtype = inner.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([i["pixel_values"] for i in images]).to(device, dtype)
        out = inner.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)


class LlavaNext(Llava):
    """LLaVA-NeXT (1.6): the picture at the grid resolution that fits it best, cut into
    crops beside a view of the whole, packed without the padding and with a newline
    embedding after each row: how many tokens depends on the picture's size."""

    def whole(self, processor: Any, image: Any) -> Prepared:
        out = processor(images=[image], return_tensors="pt")
        pixels, sizes = out["pixel_values"], out["image_sizes"]  # [1, crops, 3, H, W], [1, 2]
        height, width = int(sizes[0][0]), int(sizes[0][1])
        length = self._tokens(height, width, pixels.shape[-2], pixels.shape[-1])
        return Prepared({"pixel_values": pixels[0], "image_sizes": sizes}, length)

    def _tokens(self, height: int, width: int, crop_height: int, crop_width: int) -> int:
        """As LlavaNextProcessor counts them: the base view's patches, the crops' patches
        with the padding taken off, and a newline per row of them."""
        from transformers.image_processing_utils import select_best_resolution

        best_height, best_width = select_best_resolution(
            (height, width), self.config.image_grid_pinpoints
        )
        patch = int(self.config.vision_config.patch_size)
        rows, cols = crop_height // patch, crop_width // patch
        current_height = rows * (best_height // crop_height)
        current_width = cols * (best_width // crop_width)
        if width / height > current_width / current_height:
            scaled = int(round(height * (current_width / width), 7))
            current_height -= ((current_height - scaled) // 2) * 2
        else:
            scaled = int(round(width * (current_height / height), 7))
            current_width -= ((current_width - scaled) // 2) * 2
        count = current_height * current_width + current_height + rows * cols
        return count + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        inner = backbone(model).model
        weight = inner.multi_modal_projector.linear_1.weight
        pixels = torch.cat([i["pixel_values"] for i in images]).to(weight.device, weight.dtype)
        out = inner.get_image_features(
            pixel_values=pixels,  # every image's crops, one after another
            image_sizes=torch.cat([i["image_sizes"] for i in images]),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)


class Gemma3(VisionFamily):
    """Gemma 3: a SigLIP tower over a fixed-size image, pooled to ``mm_tokens_per_image``
    tokens framed by begin/end-of-image tokens and blank lines; an image's tokens attend to
    each other both ways."""

    bidirectional = True

    def whole(self, processor: Any, image: Any) -> Prepared:
        out = processor(images=[image], do_pan_and_scan=False, return_tensors="pt")
        return Prepared({"pixel_values": out["pixel_values"]}, int(self.config.mm_tokens_per_image))

    def placeholder(self, tokenizer: Any) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(self.config.boi_token_id)))

    def expansion(self, tokenizer: Any, runs: list[Prepared]) -> str:
        begin = tokenizer.convert_ids_to_tokens(int(self.config.boi_token_id))
        end = tokenizer.convert_ids_to_tokens(int(self.config.eoi_token_id))
        image = tokenizer.convert_ids_to_tokens(self.image_token)
        return f"\n\n{begin}{image * runs[0].length}{end}\n\n"

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        inner = backbone(model).model
        weight = inner.multi_modal_projector.mm_input_projection_weight
        pixels = torch.cat([i["pixel_values"] for i in images]).to(weight.device, weight.dtype)
        out = inner.get_image_features(pixel_values=pixels, return_dict=True)
        return list(out.pooler_output)  # [n, tokens, hidden] -> each [tokens, hidden]


class Idefics3(VisionFamily):
    """Idefics3 and SmolVLM: a large picture is cut into tiles (rows x columns, each
    written with its <row_i_col_j> tag) plus the whole picture scaled down, each tile a run
    of tokens from a SigLIP tower whose patches a pixel shuffle merges."""

    def prepare(self, processor: Any, image: Any) -> list[Prepared]:
        out = processor(images=[[image]], return_tensors="pt", return_row_col_info=True)
        pixels = out["pixel_values"][0]  # [tiles, 3, H, W]: row-major tiles, then the whole
        mask = out.get("pixel_attention_mask")
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        vision = self.config.vision_config
        length = int((vision.image_size // vision.patch_size) ** 2 / self.config.scale_factor**2)
        runs = []
        for tile in range(pixels.shape[0]):
            part = {"pixel_values": pixels[tile : tile + 1].unsqueeze(0)}  # [1, 1, 3, H, W]
            if mask is not None:
                part["pixel_attention_mask"] = mask[0][tile : tile + 1].unsqueeze(0)
            runs.append(Prepared(part, length, (rows, cols) if tile == 0 else (0, 0)))
        return runs

    def expansion(self, tokenizer: Any, runs: list[Prepared]) -> str:
        image = str(tokenizer.convert_ids_to_tokens(self.image_token)) * runs[0].length
        around, whole = "<fake_token_around_image>", "<global-img>"
        rows, cols = runs[0].grid
        text = ""
        for row in range(rows):
            for col in range(cols):
                text += f"{around}<row_{row + 1}_col_{col + 1}>{image}"
            text += "\n"
        return text + ("\n" if rows else "") + f"{around}{whole}{image}{around}"

    def encode(self, model: Any, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        inner = backbone(model).model
        # each tile its own row: [tiles, 1, 3, H, W]; a blank tile (all zeros) would be
        # dropped as padding and fail the runner's length check
        pixels = torch.cat([i["pixel_values"] for i in images]).to(inner.device)
        masks = [i["pixel_attention_mask"] for i in images if "pixel_attention_mask" in i]
        mask = torch.cat(masks).to(inner.device) if len(masks) == len(images) else None
        out = inner.get_image_features(
            pixel_values=pixels, pixel_attention_mask=mask, return_dict=True
        )
        return list(out.pooler_output)  # each [tokens, hidden]


FAMILIES: dict[str, type[VisionFamily]] = {
    "qwen2_vl": Qwen2VL,
    "llava": Llava,
    "llava_next": LlavaNext,
    "gemma3": Gemma3,
    "idefics3": Idefics3,
}


def vision_family(architecture: str, config: Any, processor: Any = None) -> VisionFamily | None:
    """The family of a recorded architecture (None: not a vision model we serve)."""
    name = VISION_ARCHITECTURES.get(architecture)
    family = FAMILIES.get(name or "")
    return family(config, processor) if family is not None else None


def text_config(config: Any) -> Any:
    """The language model's config (vision-language configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config

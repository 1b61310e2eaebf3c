"""Offline factory for tiny random-weight vision-language models (issue 16).

Like tests/factory.py: nothing touches the network; the tokenizer is factory.py's byte-level
BPE with the family's image tokens added as special tokens, the weights are random and
seeded, everything is safetensors. Each model directory also holds the image processor's
``preprocessor_config.json`` and a chat template close to the family's real one, so it
imports through the registry like a checkpoint from the Hub.

* :func:`make_tiny_qwen2_vl` -- ``Qwen2VLForConditionalGeneration`` or Qwen2.5-VL's (M-RoPE,
  merged patches; images up to ``max_pixels`` become a few dozen tokens).
* :func:`make_tiny_llava` -- ``LlavaForConditionalGeneration`` (a CLIP vision tower, a
  projector and a Llama language model; a fixed number of tokens per image).
* :func:`make_tiny_gemma3_vision` -- ``Gemma3ForConditionalGeneration`` (a SigLIP tower;
  image tokens framed by begin/end-of-image tokens, attending to each other both ways).
* :func:`make_image` -- a deterministic RGB picture as PIL image or encoded bytes.
"""

from __future__ import annotations

import functools
import io
import json
import pathlib
from os import PathLike
from typing import Any

from tests.factory import END_OF_TURN, SPECIAL_TOKENS, _reinit_, make_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = (
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
)

# Qwen2-VL's own template, shortened (no video, no vision ids): images are content parts.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_IMAGE = "<image>"
# LLaVA 1.5's template as transformers ships it (USER: <image>\n... ASSISTANT:)
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer(extra: list[str], template: str) -> Any:
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS[4:], *extra]})
    tok.chat_template = template
    return tok


def _llama_text(tok: Any, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """The Llama language model of the LLaVA and Idefics3 families."""
    return {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _save(model: Any, tok: Any, out: pathlib.Path, preprocessor: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_of_turn],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def make_tiny_qwen2_vl(
    path: str | PathLike[str],
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    version: str = "2",
) -> pathlib.Path:
    """A tiny Qwen2-VL directory (``version`` "2.5": Qwen2.5-VL, whose tower attends in
    windows but for its last block): 4 heads of 16 dims (M-RoPE sections 2/3/3), a 2-block
    vision tower of width 32 with 14-pixel patches merged 2x2, images resized to at most
    112x112 pixels (16 tokens)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    later = version == "2.5"
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if later:
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden_size,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        vision |= {"embed_dim": 32, "hidden_size": hidden_size, "mlp_ratio": 2}
    config_class = Qwen2_5_VLConfig if later else Qwen2VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration if later else Qwen2VLForConditionalGeneration

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(
        [IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD], QWEN2_VL_TEMPLATE
    )
    heads = 4
    config = config_class(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            "tie_word_embeddings": True,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
        tie_word_embeddings=True,
        architectures=[model_class.__name__],
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _reinit_(model, torch.Generator().manual_seed(seed), std=0.5)
    _save(
        model,
        tok,
        out,
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor" if later else "Qwen2VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "min_pixels": 56 * 56,
            "max_pixels": 112 * 112,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        },
    )
    return out


def make_image(width: int = 64, height: int = 48, seed: int = 0, fmt: str | None = "PNG") -> Any:
    """A deterministic picture: smooth gradients plus seeded noise, so different seeds give
    visibly different images. ``fmt``: encoded bytes in that format; None: the PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), (x + y) % 256], axis=-1
    )
    noise = rng.integers(0, 64, size=(height, width, 3))
    pixels = ((base + noise) % 256).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if fmt is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_tiny_llava(
    path: str | PathLike[str], seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2
) -> pathlib.Path:
    """A tiny LLaVA 1.5 directory: a 2-layer CLIP tower of width 32 over 56x56 crops in
    14-pixel patches (16 tokens per image, the CLS token dropped as LLaVA's "default"
    strategy does), a two-layer projector, and a Llama language model."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer([LLAVA_IMAGE], LLAVA_TEMPLATE)
    config = LlavaConfig(
        text_config=_llama_text(tok, hidden_size, num_layers),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": 32,
        },
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    _reinit_(model, torch.Generator().manual_seed(seed), std=0.5)
    _save(
        model,
        tok,
        out,
        {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 56},
            "do_center_crop": True,
            "crop_size": {"height": 56, "width": 56},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
            "resample": 3,
        },
    )
    return out


def make_vision_lora(
    model_dir: str | PathLike[str],
    out_dir: str | PathLike[str],
    target_modules: list[str] | str,
    *,
    r: int = 4,
    seed: int = 0,
) -> pathlib.Path:
    """A peft LoRA adapter for a vision-language model (seeded random A and B, large enough
    to change its greedy replies); ``target_modules`` as peft takes it (names or a regex)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out = pathlib.Path(out_dir)
    model.save_pretrained(out)
    return out


BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Gemma 3's template, shortened: images are content parts written as <start_of_image>
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_tiny_gemma3_vision(
    path: str | PathLike[str], seed: int = 0, *, hidden_size: int = 64, num_layers: int = 4
) -> pathlib.Path:
    """A tiny Gemma 3 with vision: a 2-layer SigLIP tower over 56x56 images in 14-pixel
    patches (16 tokens per image, pooled 1:1), and a Gemma 3 language model whose layers
    alternate sliding (window 32) and full attention; image tokens attend to each other
    both ways, as Gemma 3 does."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer([BOI, EOI, IMAGE_SOFT], GEMMA3_TEMPLATE)
    heads = 4
    layer_types = [
        "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(num_layers)
    ]
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "head_dim": hidden_size // heads,
            "query_pre_attn_scalar": hidden_size // heads,
            "sliding_window": 32,
            "layer_types": layer_types,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=16,
        boi_token_index=tok.convert_tokens_to_ids(BOI),
        eoi_token_index=tok.convert_tokens_to_ids(EOI),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_SOFT),
        architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    model.config.hidden_size = hidden_size  # _reinit_ scales Gemma's embeddings by it
    _reinit_(model, torch.Generator().manual_seed(seed), std=0.5)
    del model.config.hidden_size
    with torch.no_grad():  # _reinit_ gives norms Gemma's (1 + w) gains; SigLIP's are w
        for module in model.model.vision_tower.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
    _save(
        model,
        tok,
        out,
        {
            "image_processor_type": "Gemma3ImageProcessor",
            "processor_class": "Gemma3Processor",
            "do_resize": True,
            "size": {"height": 56, "width": 56},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
            "do_pan_and_scan": False,
        },
    )
    return out


IDEFICS_IMAGE, AROUND, GLOBAL, END_OF_UTTERANCE = (
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
)
ROW_COLS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# Idefics3's template as shipped: content is always a list of parts
IDEFICS3_TEMPLATE = (
    "<bos>{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def make_tiny_idefics3(
    path: str | PathLike[str],
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    smolvlm: bool = False,
) -> pathlib.Path:
    """A tiny Idefics3 (``smolvlm``: SmolVLM, the same design): pictures scaled to at most
    112 pixels and cut into 56-pixel tiles (rows x columns, plus the whole picture at 56),
    each tile through a 2-layer SigLIP tower in 14-pixel patches, pixel-shuffled 2x2 into 4
    tokens, then a Llama."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    config_class = SmolVLMConfig if smolvlm else Idefics3Config
    model_class = SmolVLMForConditionalGeneration if smolvlm else Idefics3ForConditionalGeneration
    kind = "SmolVLM" if smolvlm else "Idefics3"

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(
        [IDEFICS_IMAGE, AROUND, GLOBAL, END_OF_UTTERANCE, *ROW_COLS], IDEFICS3_TEMPLATE
    )
    config = config_class(
        text_config=_llama_text(tok, hidden_size, num_layers),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids(IDEFICS_IMAGE),
        tie_word_embeddings=False,
        architectures=[model_class.__name__],
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _reinit_(model, torch.Generator().manual_seed(seed), std=0.5)
    _save(
        model,
        tok,
        out,
        {
            "image_processor_type": f"{kind}ImageProcessor",
            "processor_class": f"{kind}Processor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"longest_edge": 112},
            "resample": 1,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_pad": True,
            "do_image_splitting": True,
            "max_image_size": {"longest_edge": 56},
        },
    )
    return out


def make_tiny_llava_next(
    path: str | PathLike[str], seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2
) -> pathlib.Path:
    """A tiny LLaVA-NeXT: 56-pixel crops on a grid of 56 or 112 pixels a side, a 2-layer
    CLIP tower in 14-pixel patches, a Llama; a picture fills 16 tokens for its whole view
    plus its crops' unpadded patches and a newline per row."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer([LLAVA_IMAGE], LLAVA_TEMPLATE)
    grid = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = LlavaNextConfig(
        text_config=_llama_text(tok, hidden_size, num_layers),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": 32,
        },
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        image_grid_pinpoints=grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        architectures=["LlavaNextForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    _reinit_(model, torch.Generator().manual_seed(seed), std=0.5)
    _save(
        model,
        tok,
        out,
        {
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 56},
            "do_center_crop": True,
            "crop_size": {"height": 56, "width": 56},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
            "do_pad": True,
            "image_grid_pinpoints": grid,
            "resample": 3,
        },
    )
    return out


MAKERS = {
    "qwen2_vl": make_tiny_qwen2_vl,
    "qwen2_5_vl": functools.partial(make_tiny_qwen2_vl, version="2.5"),
    "llava": make_tiny_llava,
    "llava_next": make_tiny_llava_next,
    "gemma3": make_tiny_gemma3_vision,
    "idefics3": make_tiny_idefics3,
    "smolvlm": functools.partial(make_tiny_idefics3, smolvlm=True),
}
"""Every tiny vision family, by name: ``MAKERS[name](path)`` builds it."""

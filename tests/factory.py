"""Offline factory for tiny random-weight Hugging Face causal LMs used as test fixtures.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on the spot
(``tokenizers`` library) on a small built-in corpus, and the models are built from configs
with random, seeded weights. Everything is written as safetensors (never pickle / ``.bin``).

Public API:

* :data:`FAMILIES` -- the model families :func:`make_tiny_model` can build.
* :func:`make_tokenizer` -- the shared byte-level BPE tokenizer (about 512 tokens) with
  Gemma-style special tokens and chat template.
* :func:`make_tiny_model` -- a tiny ``llama`` / ``qwen2`` / ``gemma3`` (text-only) model
  directory: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
  tokenizer files.
* :func:`make_lora_adapter` -- a PEFT LoRA adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) for such a model, with non-zero A and B so it visibly
  changes greedy output.

Token ids of the special tokens follow Gemma's layout: ``<pad>`` = 0, ``<eos>`` = 1,
``<bos>`` = 2, ``<unk>`` = 3, ``<start_of_turn>`` = 4, ``<end_of_turn>`` = 5. Like Gemma, the
tokenizer prepends ``<bos>`` when ``add_special_tokens=True`` and the chat template starts
with ``{{ bos_token }}``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from os import PathLike
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["FAMILIES", "make_lora_adapter", "make_tiny_model", "make_tokenizer"]

FAMILIES = ("llama", "qwen2", "gemma3", "qwen3", "mistral", "phi3")

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)  # ids 0..5, in this order

VOCAB_SIZE = 512

# Gemma-style turns; "assistant" is rendered as "model". Content may be a string or a list of
# OpenAI-style parts ({"type": "text", "text": ...}); it is not trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = namespace(text='') %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% set content.text = content.text + part['text'] %}{% endif %}{% endfor %}"
    "{% set content = content.text %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ content }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that wanted to talk.",
    "The server loads the model, applies the adapter and streams tokens back to the client.",
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more strongly.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "user: what is two plus two? model: two plus two is four.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2024-01-01 12:30:45",
    "Code: def main(argv: list[str]) -> int:\n    return 0  # done\n",
    'JSON: {"name": "tiny", "size": 64, "ok": true, "items": [1, 2, 3]}',
    "Punctuation: ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ! ? ; : , . ' \" ` ~",
    "Le café est délicieux. Où est la bibliothèque? Très bien, merci beaucoup!",
    "Der Bär läuft über die Straße. Schöne Grüße aus München und Köln.",
    "El niño comió piña en la mañana. ¿Dónde está el baño? ¡Qué día!",
    "Ação, coração, informação, não, São Paulo, português.",
    "Привет, мир! Как дела? Москва и Санкт-Петербург.",
    "Γειά σου κόσμε. Καλημέρα!",
    "你好，世界！今天天气很好。我们一起学习中文。",
    "こんにちは世界。ありがとうございます。東京へようこそ。",
    "안녕하세요 세계. 감사합니다.",
    "مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।",
    "Emoji: 🙂 😀 🎉 🚀 ❤️ 👍 🌍 🐍 🤖 ✨ 👩‍💻 🇫🇷",
    "Math: ∑ ∫ √ π ≈ ≠ ≤ ≥ ∞ → ← ° ± × ÷ € £ ¥ © ®",
    "héllo wörld 你好 🙂 naïve façade coöperate résumé jalapeño",
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process and return its ``tokenizer.json`` text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent words win merges over one-off pairs.
    corpus = [line for line in _CORPUS for _ in range(3)]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    # Canonicalise (sorted keys) so the text is byte-identical however training ordered things.
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, sort_keys=True)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Return a fresh fast tokenizer (byte-level BPE, vocab about 512) with a chat template.

    Special tokens: ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3),
    ``<start_of_turn>`` (4), ``<end_of_turn>`` (5). Round-trips arbitrary unicode text
    (decode with ``skip_special_tokens=True`` to drop the leading ``<bos>``). Training happens
    once per process; each call builds a new, independent tokenizer object from the cache.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _family_config(
    family: str, vocab_size: int, hidden_size: int, num_layers: int, tok: PreTrainedTokenizerFast
):
    """The transformers config for a tiny model of ``family``."""
    heads = 4
    head_dim = max(1, hidden_size // heads)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    if family == "qwen2":
        from transformers import Qwen2Config

        common.pop("head_dim")  # Qwen2 derives it from hidden_size / num_attention_heads
        return Qwen2Config(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=True,  # as in the small Qwen2 / Qwen2.5 checkpoints
            use_sliding_window=False,
            architectures=["Qwen2ForCausalLM"],
        )
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        # Alternate sliding / full attention so both code paths exist (last layer full when
        # num_layers is even, mirroring Gemma 3's "every n-th layer is global").
        layer_types = [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(num_layers)
        ]
        return Gemma3TextConfig(
            **common,
            num_key_value_heads=1,
            query_pre_attn_scalar=head_dim,
            sliding_window=32,
            layer_types=layer_types,
            tie_word_embeddings=True,
            architectures=["Gemma3ForCausalLM"],
        )
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            architectures=["Qwen3ForCausalLM"],
        )
    if family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(
            **common,
            num_key_value_heads=2,
            sliding_window=24,  # short, so prompts of the tests slide past it
            tie_word_embeddings=False,
            architectures=["MistralForCausalLM"],
        )
    if family == "phi3":
        from transformers import Phi3Config

        common.pop("head_dim")
        return Phi3Config(
            **common,
            num_key_value_heads=2,
            partial_rotary_factor=0.75,  # as Phi-4-mini: rope on part of each head
            sliding_window=None,
            tie_word_embeddings=False,
            architectures=["Phi3ForCausalLM"],
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _reinit_(model: PreTrainedModel, generator: torch.Generator, std: float) -> None:
    """Overwrite every parameter deterministically (independent of transformers' own init).

    Matrices get N(0, std), embeddings N(0, 1), biases N(0, 0.1), RMSNorm weights the
    identity. Gemma needs more care, because its input embeddings are scaled by
    sqrt(hidden_size), tied to the output head, and every sublayer output is re-normalised
    ("sandwich" norms): with plain gains the residual stream is dominated by the input token
    (greedy decoding echoes it) or by the near-constant average of flat attention (greedy
    decoding repeats one token). So for Gemma the embeddings get N(0, 1 / hidden_size), the
    post-attention / post-feedforward norms gains 4 / 8, and the q / k norms a gain of 4.

    Finally the output rows of the special tokens are scaled down so their logits sit near
    zero, far below the best ordinary token: greedy decoding never emits ``<eos>``,
    ``<end_of_turn>``, ``<pad>`` etc., so generation always runs to its token limit.
    """
    import torch

    gemma = type(model).__name__.startswith("Gemma")
    # Gemma RMSNorm multiplies by (1 + w), the others by w.
    gemma_gains = {"post_attention_layernorm": 4.0, "post_feedforward_layernorm": 8.0}
    gemma_gains |= {"q_norm": 4.0, "k_norm": 4.0}
    embed_std = 1.0 / math.sqrt(model.config.hidden_size) if gemma else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                scale = embed_std if "embed" in name else std
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "norm" in name:
                if gemma:
                    module_name = name.rsplit(".", 2)[-2]
                    param.fill_(gemma_gains.get(module_name, 1.0) - 1.0)
                else:
                    param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        # Tied heads share this tensor with the input embeddings; scaling it there is harmless.
        model.get_output_embeddings().weight[: len(SPECIAL_TOKENS)] *= 0.05


def make_tiny_model(
    path: str | PathLike[str],
    family: str = "llama",
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    dtype: str = "float32",
) -> pathlib.Path:
    """Build, save and return a tiny random-weight causal LM directory at ``path``.

    ``family`` is one of :data:`FAMILIES` (``gemma3`` is the text-only ``Gemma3ForCausalLM``
    with ``model_type`` ``gemma3_text``). Weights depend only on ``seed`` and the sizes.
    4 attention heads of ``hidden_size // 4`` dims, 2 key/value heads (1 for gemma3),
    intermediate size ``2 * hidden_size``, vocab = ``len(make_tokenizer())``. ``dtype`` is a
    torch dtype name (``float32``, ``bfloat16``, ``float16``) used for the saved weights.
    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
    tokenizer files; never pickle files. ``generation_config.json`` stops on ``<eos>`` and
    ``<end_of_turn>``, but greedy decoding never emits special tokens (see ``_reinit_``).

    Note: transformers 5 ``AutoTokenizer`` loads a ``qwen2`` directory as ``Qwen2Tokenizer``
    whatever ``tokenizer_config.json`` says; that class rebuilds the pipeline with an NFC
    normaliser and Qwen's pre-tokenizer regex (digits split one by one), so its ids can differ
    from :func:`make_tokenizer`'s for digits and non-NFC text. The other families load the
    saved tokenizer unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    config = _family_config(family, len(tok), hidden_size, num_layers, tok)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    _reinit_(model, generator, std=0.5)
    model = model.to(torch_dtype).eval()
    model.config.dtype = dtype

    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_of_turn],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)  # safetensors is the only format transformers 5 writes
    tok.save_pretrained(out)
    return out


def make_lora_adapter(
    model_dir: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    r: int = 4,
    alpha: int = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    base_name: str | None = None,
    use_dora: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> pathlib.Path:
    """Build, save and return a LoRA adapter at ``out_dir`` for the model in ``model_dir``.

    Targets all attention and MLP projections unless ``target_modules`` is given. Both LoRA
    matrices are seeded random (N(0, 0.3)), large enough that the adapter changes the base
    model's greedy output. ``use_dora`` makes a DoRA adapter (its magnitudes: peft's, from
    the random A and B, times a seeded factor in [0.5, 1.5)); ``task_type=None`` saves it
    the way peft does without one (``auto_mapping`` naming the transformers base class).
    ``adapter_config.json`` records ``base_model_name_or_path`` as ``base_name`` (default:
    ``str(model_dir)``). Writes ``adapter_config.json``, ``adapter_model.safetensors`` and
    PEFT's model-card ``README.md``; never pickle files.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    modules = target_modules or [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=modules,
        init_lora_weights=False,
        use_rslora=use_rslora,
        use_dora=use_dora,
        task_type=task_type,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return _save_adapter(peft_model, model_dir, out_dir, base_name, modules)


def make_ia3_adapter(
    model_dir: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    target_modules: list[str] | None = None,
    feedforward_modules: list[str] | None = None,
    seed: int = 0,
    base_name: str | None = None,
) -> pathlib.Path:
    """Build, save and return an IA3 adapter at ``out_dir`` for the model in ``model_dir``,
    like :func:`make_lora_adapter`: keys, values and the MLP input (``down_proj``, a
    feedforward module) unless told otherwise, each vector seeded 1 + N(0, 0.3)."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    modules = target_modules or ["k_proj", "v_proj", "down_proj"]
    feedforward = feedforward_modules if feedforward_modules is not None else ["down_proj"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = IA3Config(
        target_modules=modules, feedforward_modules=feedforward, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.3)
    return _save_adapter(peft_model, model_dir, out_dir, base_name, modules)


def _save_adapter(
    peft_model: Any,
    model_dir: str | PathLike[str],
    out_dir: str | PathLike[str],
    base_name: str | None,
    modules: list[str],
) -> pathlib.Path:
    peft_model.peft_config["default"].base_model_name_or_path = (
        base_name if base_name is not None else str(model_dir)
    )

    out = pathlib.Path(out_dir)
    # An explicit save_embedding_layers stops PEFT looking base_name up on the Hub (it would,
    # to check whether the vocabulary was resized, when base_name is not a local directory).
    embeddings_targeted = any(m in ("embed_tokens", "lm_head") for m in modules)
    peft_model.save_pretrained(
        str(out), safe_serialization=True, save_embedding_layers=embeddings_targeted
    )
    return out


BERT_WORDS = [
    *["the", "a", "an", "cat", "dog", "sat", "on", "mat", "hello", "world", "embedding"],
    *["model", "is", "fast", "slow", "red", "blue", "green", "sky", "sea", "tree", "house"],
    *["river", "mountain", "book", "read", "write", "code", "server", "token"],
]  # fmt: skip


def make_tiny_bert(
    out_dir: str | PathLike[str], *, pooling: str | None = None, seed: int = 0
) -> pathlib.Path:
    """A tiny random BERT encoder with a WordPiece tokenizer made on the spot, saved as a
    Hugging Face directory (safetensors). With ``pooling`` ("mean", "cls", "max",
    "lasttoken") it also gets sentence-transformers' ``modules.json`` and
    ``1_Pooling/config.json``."""
    import json

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?",
        *BERT_WORDS, *letters, *(f"##{c}" for c in letters),
    ]  # fmt: skip
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    if pooling is not None:
        st = "sentence_transformers.models."
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules))
        (out / "1_Pooling").mkdir(exist_ok=True)
        keys = {
            "mean": "pooling_mode_mean_tokens",
            "cls": "pooling_mode_cls_token",
            "max": "pooling_mode_max_tokens",
            "lasttoken": "pooling_mode_lasttoken",
        }
        settings = {
            "word_embedding_dimension": 32,
            **{k: k == keys[pooling] for k in keys.values()},
        }
        (out / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    return out


GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}


def make_tiny_gguf(
    path: str | PathLike[str],
    family: str = "llama",
    *,
    types: dict[str, str] | None = None,
    seed: int = 0,
) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny model of ``family`` written as a GGUF file the way llama.cpp's converter
    writes one: GGUF tensor names, llama's q / k rows permuted for its rope order, Gemma's
    norms stored as 1 + w, the byte-level BPE tokenizer as a ``gpt2`` vocabulary with
    merges. ``types`` maps a GGUF name fragment (``attn_q``, ``ffn_down``, ``token_embd``,
    ...) to the ggml type its matrices are stored in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16,
    F32); other matrices are Q8_0, norms F32. Returns (the GGUF file, the HF directory it
    was made from, holding the original float weights)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES
    from gguf.quants import quantize
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = pathlib.Path(path)
    hf_dir = make_tiny_model(out.parent / f"{out.stem}-hf", family, seed)
    config = AutoConfig.from_pretrained(hf_dir)
    weights = load_file(str(hf_dir / "model.safetensors"))
    arch_name = GGUF_ARCH[family]
    arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name)
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    chosen = {"token_embd": "Q8_0", **(types or {})}

    writer = GGUFWriter(str(out), arch_name)
    writer.add_name(f"tiny {family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_key_length(config.head_dim if family != "qwen2" else config.hidden_size // 4)
    writer.add_value_length(config.head_dim if family != "qwen2" else config.hidden_size // 4)
    if family == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(7)  # MOSTLY_Q8_0
    tok = json.loads(_tokenizer_json())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[BOS])
    writer.add_eos_token_id(vocab[EOS])
    writer.add_pad_token_id(vocab[PAD])
    writer.add_unk_token_id(vocab[UNK])
    writer.add_add_bos_token(True)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in weights.items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            continue
        data = tensor.float().numpy()
        if family == "llama" and gguf_name.endswith(("attn_q", "attn_k")):
            n_head = heads if gguf_name.endswith("attn_q") else kv_heads
            rows = data.shape[0]
            data = (
                data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:])
                .swapaxes(1, 2)
                .reshape(data.shape)
            )
        if family == "gemma3" and "norm" in gguf_name:
            data = data + 1
        if data.ndim == 1:
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))
            continue
        kind = next((v for k, v in chosen.items() if k in gguf_name), "Q8_0")
        qtype = GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))
        elif kind == "F16":
            writer.add_tensor(f"{gguf_name}.{suffix}", data.astype(np.float16))
        else:
            blocks = quantize(np.ascontiguousarray(data), qtype)
            writer.add_tensor(f"{gguf_name}.{suffix}", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del torch  # imported for its side effect on safetensors' torch loader
    return out, hf_dir

"""Plans how one model's weights, LoRA adapters and slot KV cache share a memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..units import GiB, human_bytes

DEFAULT_CONTEXT = 8192  # tokens per slot when the caller names none (capped by the model)
CUDA_DEFAULT_CAP = 14 * GiB  # fits a 16 GB card with room for the CUDA context and activations


class PlanError(ValueError):
    """A config, format or setting the planner cannot work with (maps to a 4xx)."""


@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How one 2-D weight matrix ``[out, in]`` is stored.

    ``bits`` per weight, plus one record of ``record_bytes`` per ``group`` consecutive input
    weights of each output row (``group == 0``: one record per output row, ``record_bytes == 0``:
    no record). Quantized formats quantize the projections and an untied ``lm_head``; the input
    embedding (and a tied ``lm_head``, the same tensor), norms and biases stay 16-bit.
    """

    name: str
    bits: int
    group: int = 0
    record_bytes: int = 0

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def matrix_bytes(self, rows: int, cols: int) -> int:
        data = -(-rows * cols * self.bits // 8)
        records = rows if self.group == 0 else rows * -(-cols // self.group)
        return data + (records * self.record_bytes if self.record_bytes else 0)


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "float32": WeightFormat("float32", 32),
    "bfloat16": WeightFormat("bfloat16", 16),
    "float16": WeightFormat("float16", 16),
    # one fp16 scale per output channel: 1 B/weight + 2 B/row
    "int8": WeightFormat("int8", 8, 0, 2),
    # groups of 32 input weights share a bf16 scale and a bf16 zero: 0.5 + 4/32 = 0.625 B/weight
    "int4": WeightFormat("int4", 4, 32, 4),
    # bitsandbytes blocks of 64 with a float32 absmax, no double quant: 0.5 + 4/64 B/weight
    "nf4": WeightFormat("nf4", 4, 64, 4),
    # groups of 32 with a bf16 scale and a bf16 zero: 0.25 + 4/32 = 0.375 B/weight
    "int2": WeightFormat("int2", 2, 32, 4),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Families whose MLP is up -> act -> down (two matrices) with biases and LayerNorms (weight + bias).
_PLAIN_MLP = {"gpt2", "gpt_neox", "phi", "starcoder2"}
_LEARNED_POSITIONS = {"gpt2"}
_QKV_BIAS_ONLY = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}
_QK_NORM = {"gemma3", "gemma3_text", "qwen3", "qwen3_moe"}
_FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}  # pre/post norms around attention and MLP
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2"}
# Values older transformers releases left out of saved configs because they were the defaults.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "vocab_size": 262208,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
    },
}


@dataclass(frozen=True, slots=True)
class Plan:
    weight_bytes: int  # resident bytes of the weights in the given format
    adapter_bytes: int  # resident bytes of N LoRA adapters
    kv_bytes_per_token: int
    activation_reserve: int  # bytes kept free for activations/workspace
    kv_budget: int  # budget - weights - adapters - reserve (>= 0)
    context: int  # tokens per sequence (slot capacity)
    sequences: int  # concurrent sequences (slots) that fit, capped by num_parallel
    kv_bytes: int  # = sequences * context * kv_bytes_per_token (what the engine allocates)
    budget: int
    fits: bool  # False when not even one sequence of `min_context` fits
    notes: list[str] = field(default_factory=list)
    parameters: int = 0
    weight_format: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    adapters: int = 0
    adapter_rank: int = 0

    @property
    def total_bytes(self) -> int:
        """What the plan keeps resident or reserved: weights, adapters, KV and the reserve."""
        return self.weight_bytes + self.adapter_bytes + self.kv_bytes + self.activation_reserve


# ---------------------------------------------------------------------------- architecture


@dataclass(frozen=True, slots=True)
class _Arch:
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int  # 0 for a dense MLP
    expert_intermediate: int
    shared_intermediate: int
    tied: bool
    max_positions: int
    multimodal: bool

    @property
    def plain_mlp(self) -> bool:
        return self.model_type in _PLAIN_MLP

    def attention(self) -> list[tuple[int, int]]:
        """The attention projections of one layer as ``(out, in)``."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q, self.hidden), (kv, self.hidden), (kv, self.hidden), (self.hidden, q)]

    def mlp(self, width: int) -> list[tuple[int, int]]:
        """One MLP's projections as ``(out, in)``: gate, up, down (or up, down)."""
        up = [] if self.plain_mlp else [(width, self.hidden)]
        return [*up, (width, self.hidden), (self.hidden, width)]


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def _int(cfg: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is None:
        raise PlanError(f"config.json has no usable {keys[0]}")
    return default


def _arch(config: dict[str, Any]) -> _Arch:
    text = _text_config(config)
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    cfg = {**_DEFAULTS.get(model_type, {}), **text}
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, "num_attention_heads", "n_head")
    experts = _int(cfg, "num_local_experts", "num_experts", default=0)
    intermediate = _int(cfg, "intermediate_size", "n_inner", default=4 * hidden)
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if not isinstance(tied, bool):
        tied = model_type in _TIED_BY_DEFAULT
    return _Arch(
        model_type=model_type,
        vocab=_int(cfg, "vocab_size"),
        hidden=hidden,
        layers=_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", default=hidden // heads),
        intermediate=intermediate,
        experts=experts,
        expert_intermediate=_int(cfg, "moe_intermediate_size", default=intermediate),
        shared_intermediate=_int(cfg, "shared_expert_intermediate_size", default=0),
        tied=tied,
        max_positions=_int(
            cfg, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", default=0
        ),
        multimodal=text is not config,
    )


def _tensors(arch: _Arch) -> list[tuple[str, int, int]]:
    """Every weight as ``(kind, rows, cols)``; kind is embed, head, proj or vector."""
    plain = arch.plain_mlp
    out: list[tuple[str, int, int]] = [("embed", arch.vocab, arch.hidden)]
    if arch.model_type in _LEARNED_POSITIONS:
        out.append(("embed", arch.max_positions, arch.hidden))
    per_layer: list[tuple[str, int, int]] = [("proj", o, i) for o, i in arch.attention()]
    # biases: plain families bias everything; qwen2 biases q/k/v only
    if plain:
        per_layer += [("vector", 1, o) for o, _ in arch.attention()]
    elif arch.model_type in _QKV_BIAS_ONLY:
        per_layer += [("vector", 1, o) for o, _ in arch.attention()[:3]]
    if arch.model_type in _QK_NORM:
        per_layer += [("vector", 1, arch.head_dim)] * 2
    if arch.experts:
        per_layer.append(("proj", arch.experts, arch.hidden))  # router
        for _ in range(arch.experts):
            per_layer += [("proj", o, i) for o, i in arch.mlp(arch.expert_intermediate)]
        if arch.shared_intermediate:
            per_layer += [("proj", o, i) for o, i in arch.mlp(arch.shared_intermediate)]
            per_layer.append(("proj", 1, arch.hidden))  # shared expert gate
    else:
        per_layer += [("proj", o, i) for o, i in arch.mlp(arch.intermediate)]
        if plain:
            per_layer += [("vector", 1, o) for o, _ in arch.mlp(arch.intermediate)]
    norms = 4 if arch.model_type in _FOUR_NORMS else 2
    norm_vectors = 2 if plain else 1  # LayerNorm has a bias, RMSNorm does not
    per_layer += [("vector", 1, arch.hidden)] * (norms * norm_vectors)
    out += per_layer * arch.layers
    out += [("vector", 1, arch.hidden)] * norm_vectors  # final norm
    if not arch.tied:
        out.append(("head", arch.vocab, arch.hidden))
    return out


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the language model computed from its shape (a vision tower is not counted)."""
    return sum(rows * cols for _, rows, cols in _tensors(_arch(config)))


def lookup_format(name: str) -> WeightFormat:
    try:
        return WEIGHT_FORMATS[name]
    except KeyError:
        known = ", ".join(WEIGHT_FORMATS)
        raise PlanError(f"unknown weight format {name!r} (known: {known})") from None


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.removeprefix("torch.")]
    except KeyError:
        raise PlanError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})") from None


def weight_bytes(config: dict[str, Any], fmt: str = "bfloat16") -> int:
    """Resident bytes of the weights in ``fmt`` (:class:`WeightFormat` says what stays 16-bit)."""
    spec = lookup_format(fmt)
    plain = 4 if fmt == "float32" else 2
    total = 0
    for kind, rows, cols in _tensors(_arch(config)):
        if kind in ("proj", "head") or (kind == "embed" and not spec.quantized):
            total += spec.matrix_bytes(rows, cols)
        else:
            total += rows * cols * plain
    return total


def kv_bytes_per_token(config: dict[str, Any], kv_dtype: str = "bfloat16") -> int:
    """K and V of every layer for one token, as the slot cache stores them."""
    arch = _arch(config)
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes(kv_dtype)


def adapter_bytes(
    config: dict[str, Any], *, count: int = 1, rank: int = 16, fmt: str = "bfloat16"
) -> int:
    """Bytes of ``count`` LoRA adapters of ``rank`` on every attention and (dense) MLP projection:
    ``rank * (in + out)`` weights per projection, 4 bytes each for float32 models, else 2."""
    arch = _arch(config)
    projections = arch.attention() + ([] if arch.experts else arch.mlp(arch.intermediate))
    per_layer = sum(rank * (o + i) for o, i in projections)
    itemsize = 4 if fmt == "float32" else 2
    return count * arch.layers * per_layer * itemsize


def default_activation_reserve(budget: int) -> int:
    """Bytes kept free inside the budget for activations and workspace: a tenth of the budget,
    but at least 1 GiB (at least a quarter of budgets under 4 GiB)."""
    return max(min(GiB, budget // 4), budget // 10)


# ---------------------------------------------------------------------------- planning


def _slots(kv_budget: int, context: int, per_token: int, num_parallel: int) -> int:
    return min(num_parallel, kv_budget // (context * per_token)) if per_token else num_parallel


def plan_memory(
    config: dict[str, Any],
    *,
    budget: int,
    kv_dtype: str = "bfloat16",
    weight_format: str = "bfloat16",
    num_parallel: int = 16,
    context: int | None = None,
    min_context: int = 512,
    adapters: int = 0,
    adapter_rank: int = 16,
    activation_reserve: int | None = None,
) -> Plan:
    """Splits ``budget`` into weights, adapters, an activation reserve and KV slots.

    The context defaults to the model's context length capped at 8192 tokens. When not one
    sequence of that context fits, the context is halved down to ``min_context``."""
    for label, value, low in (
        ("budget", budget, 0),
        ("num_parallel", num_parallel, 1),
        ("min_context", min_context, 1),
        ("adapters", adapters, 0),
        ("adapter_rank", adapter_rank, 1),
    ):
        if value < low:
            raise PlanError(f"{label} must be at least {low}, not {value}")
    if context is not None and context < 1:
        raise PlanError(f"context must be at least 1, not {context}")
    if activation_reserve is not None and activation_reserve < 0:
        raise PlanError("activation_reserve must not be negative")

    arch = _arch(config)
    notes: list[str] = []
    weights = weight_bytes(config, weight_format)
    lora = adapter_bytes(config, count=adapters, rank=adapter_rank, fmt=weight_format)
    per_token = kv_bytes_per_token(config, kv_dtype)
    reserve = (
        default_activation_reserve(budget) if activation_reserve is None else activation_reserve
    )
    kv_budget = max(0, budget - weights - lora - reserve)
    if weights + lora > budget:
        notes.append(f"weights and adapters ({human_bytes(weights + lora)}) exceed the budget")
    if WEIGHT_FORMATS[weight_format].quantized:
        notes.append(f"projections and lm_head in {weight_format}; embeddings and norms 16-bit")
    if arch.multimodal:
        notes.append("language model only: a vision tower is not counted")
    if arch.experts:
        notes.append(f"all {arch.experts} experts of every layer counted as resident")

    if context is None:
        context = min(arch.max_positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        if not arch.max_positions:
            notes.append(f"config names no context length; assuming {DEFAULT_CONTEXT}")
    elif arch.max_positions and context > arch.max_positions:
        notes.append(f"context {context} capped at the model's {arch.max_positions}")
        context = arch.max_positions

    requested, floor = context, min(min_context, context)
    sequences = _slots(kv_budget, context, per_token, num_parallel)
    while sequences == 0 and context > floor:
        context = max(floor, context // 2)
        sequences = _slots(kv_budget, context, per_token, num_parallel)
    fits = sequences > 0
    if not fits:
        notes.append(
            f"not one sequence of {context} tokens fits: it needs "
            f"{human_bytes(context * per_token)} of KV, {human_bytes(kv_budget)} is left after "
            "weights, adapters and reserve"
        )
    elif context < requested:
        notes.append(f"context shrunk from {requested} to {context} so one sequence fits")
    elif sequences == num_parallel and per_token:
        room = kv_budget // (context * per_token)
        if room > num_parallel:
            notes.append(f"KV room for {room} sequences; capped by num_parallel={num_parallel}")

    return Plan(
        weight_bytes=weights,
        adapter_bytes=lora,
        kv_bytes_per_token=per_token,
        activation_reserve=reserve,
        kv_budget=kv_budget,
        context=context,
        sequences=sequences,
        kv_bytes=sequences * context * per_token,
        budget=budget,
        fits=fits,
        notes=notes,
        parameters=count_parameters(config),
        weight_format=weight_format,
        kv_dtype=kv_dtype,
        adapters=adapters,
        adapter_rank=adapter_rank,
    )


SERVING_MIN_CONTEXT = 512  # the engine shrinks the context down to this before giving up


def model_context(config: dict[str, Any]) -> int:
    """The model's own context length from its config (0 when it names none)."""
    return _arch(config).max_positions


def serving_plan(
    config: dict[str, Any],
    *,
    budget: int,
    dtype: str,
    weight_format: str | None = None,
    num_parallel: int,
    context_length: int,
    adapters: int = 0,
    adapter_rank: int = 16,
) -> Plan:
    """The plan the engine allocates when it loads a model, and what `ollama-compact plan`
    prints: the one place that turns settings into planner inputs.

    ``budget`` counts weights, adapters and KV only (OCS_MEMORY_BUDGET; its CUDA default
    leaves the room for activations), so no activation reserve is taken from it. The KV
    cache is kept in the serving ``dtype``; weights in ``weight_format`` (default: that
    dtype). The context is ``context_length`` capped by the model's own, halved down to
    512 tokens when not one sequence fits."""
    context = min(context_length, model_context(config) or context_length)
    plan = plan_memory(
        config,
        budget=max(budget, 0),
        kv_dtype=dtype,
        weight_format=weight_format or dtype,
        num_parallel=num_parallel,
        context=context,
        min_context=min(SERVING_MIN_CONTEXT, context),
        adapters=adapters,
        adapter_rank=adapter_rank,
        activation_reserve=0,
    )
    plan.notes.append("the budget holds weights, adapters and KV; activations need room beyond it")
    return plan


def default_budget(
    device: str, *, total_device_memory: int | None = None, total_ram: int | None = None
) -> int:
    """The budget for weights plus KV when the setting says auto: on CUDA the smaller of 14 GiB
    and 90% of the card (a 16 GB card keeps room for activations); on CPU (or MPS) half the RAM."""
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        total = _cuda_memory(device) if total_device_memory is None else total_device_memory
        return min(CUDA_DEFAULT_CAP, total * 9 // 10)
    if kind in ("cpu", "mps"):
        return (_ram() if total_ram is None else total_ram) // 2
    raise PlanError(f"no default memory budget for device {device!r}")


def _cuda_memory(device: str) -> int:
    import torch  # lazily: the planner itself stays importable without torch

    if not torch.cuda.is_available():
        raise PlanError("CUDA is not available")
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------- display


def format_plan(plan: Plan, name: str = "") -> str:
    """A small human-readable table of the plan (for the CLI)."""
    title = f"Memory plan{' for ' + name if name else ''}"
    if plan.parameters:
        title += f" ({plan.parameters / 1e9:.2f}B parameters)"
    adapters = f"{plan.adapters} × rank {plan.adapter_rank}" if plan.adapters else ""
    rows = [
        ("weights", human_bytes(plan.weight_bytes), plan.weight_format),
        ("adapters", human_bytes(plan.adapter_bytes), adapters),
        ("activation reserve", human_bytes(plan.activation_reserve), ""),
        ("KV per token", human_bytes(plan.kv_bytes_per_token), plan.kv_dtype),
        (
            "KV cache",
            human_bytes(plan.kv_bytes),
            f"{plan.sequences} sequences × {plan.context} tokens",
        ),
        ("total", human_bytes(plan.total_bytes), f"of {human_bytes(plan.budget)} budget"),
        ("fits", "yes" if plan.fits else "NO", ""),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [title]
    for label, value, detail in rows:
        lines.append(f"  {label:<{width}}  {value:>11}  {detail}".rstrip())
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)

"""The PEFT adapter types we serve (LoRA, rsLoRA, DoRA, IA3): what an adapter_config.json
and the tensor names of its safetensors file may hold, checked at import without torch, and
read the same way by the engine's adapter reader (modeling/lora.py)."""

from __future__ import annotations

import math
import re
from typing import Any

import regex

from .errors import InvalidModel
from .manifest import AdapterInfo
from .tensors import TensorInfo

LORA, DORA, IA3 = "lora", "dora", "ia3"
SUPPORTED = "LoRA (also rsLoRA and DoRA) and IA3"

# tensor name marker -> part: LoRA's A and B, DoRA's magnitude vector, IA3's scaling vector
# (and LoRA on embeddings, recognised only to be refused)
TENSOR_PARTS = (
    (".lora_A.", "A"),
    (".lora_B.", "B"),
    (".lora_embedding_A", "eA"),
    (".lora_embedding_B", "eB"),
    (".lora_magnitude_vector", "M"),
    (".ia3_l", "L"),
)
PARTS_OF = {LORA: {"A", "B"}, DORA: {"A", "B", "M"}, IA3: {"L"}}
PART_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector", "L": "ia3_l"}
LABELS = {LORA: "LoRA", DORA: "DoRA", IA3: "IA3"}

# what peft writes as auto_mapping when an adapter is saved without a task_type: the
# transformers class of the base, for AutoPeftModel (which imports it; we never do)
AUTO_MAPPING_KEYS = {"base_model_class", "parent_library"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
TRANSFORMERS_MODULE = re.compile(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*){0,8}")
MAX_PATTERN = 500
PATTERN_SECONDS = 0.1  # to match feedforward_modules against one module name


def adapter_kind(config: dict[str, Any]) -> str:
    """``lora``, ``dora`` or ``ia3``; InvalidModel for any other PEFT type."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        return DORA if config.get("use_dora") else LORA
    if peft_type == "IA3":
        return IA3
    raise InvalidModel(
        f"unsupported adapter type {peft_type[:40] or 'unknown'!r}: the supported types are "
        f"{SUPPORTED}"
    )


def check_auto_mapping(config: dict[str, Any]) -> None:
    """Accepts ``auto_mapping`` only as the metadata peft records (the base's transformers
    class and module, both plain names; nothing here ever imports them); anything else
    there asks for code and is refused."""
    mapping = config.get("auto_mapping")
    if mapping is None or mapping == {}:
        return
    refused = InvalidModel("adapter_config.json asks for custom code (auto_mapping); refused")
    if not isinstance(mapping, dict) or set(mapping) != AUTO_MAPPING_KEYS:
        raise refused
    cls, library = mapping["base_model_class"], mapping["parent_library"]
    if not isinstance(cls, str) or not isinstance(library, str):
        raise refused
    if not IDENTIFIER.fullmatch(cls) or not TRANSFORMERS_MODULE.fullmatch(library):
        raise InvalidModel(
            "adapter_config.json's auto_mapping names a base model class outside "
            "transformers (custom code); refused"
        )


def is_feedforward(config: dict[str, Any], module: str) -> bool:
    """peft's own rule (IA3Model._check_target_module_feedforward): a module scales its
    input when ``feedforward_modules`` (a list of name suffixes, or one regular expression
    matching the whole module path) names it, else its output."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        # the adapter's own pattern: matched with a deadline (a pathological pattern such as
        # "(a+)+b" would otherwise take exponential time on the engine's loader thread)
        try:
            return regex.fullmatch(modules, module, timeout=PATTERN_SECONDS) is not None
        except TimeoutError:
            raise InvalidModel(
                "feedforward_modules takes too long to match a module name; refused"
            ) from None
    return any(module.endswith(name) for name in modules)


def tensor_part(key: str) -> tuple[str, str] | None:
    """(module path, part) of an adapter tensor name, or None when it is no adapter part."""
    stem = key.removeprefix("base_model.model.")
    for marker, part in TENSOR_PARTS:
        if marker in stem:
            return stem.split(marker, 1)[0], part
    return None


def _names(value: Any, field: str) -> list[str] | str:
    if value is None:
        return []
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidModel(f"{field} must be a list of module names")
    return value


def check_adapter_config(config: dict[str, Any]) -> AdapterInfo:
    """Accepts the adapter types we serve; refuses what would run code or what we cannot
    serve, with a message naming what is supported."""
    check_auto_mapping(config)
    kind = adapter_kind(config)
    if config.get("modules_to_save"):
        raise InvalidModel(
            "adapters with modules_to_save (fully trained extra modules) are not supported; "
            "merge them into a model and import that instead"
        )
    if config.get("fan_in_fan_out"):
        raise InvalidModel("adapters with fan_in_fan_out (GPT-2 style Conv1D layers) are refused")
    targets = _names(config.get("target_modules"), "target_modules")
    target_list = [targets] if isinstance(targets, str) else targets
    if kind == IA3:
        feedforward = _names(config.get("feedforward_modules"), "feedforward_modules")
        if isinstance(feedforward, str):
            try:
                if len(feedforward) > MAX_PATTERN:
                    raise re.error("too long")
                re.compile(feedforward)
            except re.error:
                raise InvalidModel("feedforward_modules is not a usable pattern") from None
        if not isinstance(feedforward, str):
            feedforward = sorted(feedforward)
        return AdapterInfo(
            peft_type="IA3",
            r=0,
            alpha=0.0,
            target_modules=sorted(target_list),
            feedforward_modules=feedforward,
        )
    r = config.get("r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= 4096:
        raise InvalidModel(f"adapter rank r={str(r)[:20]} is out of range (1-4096)")
    if (
        not isinstance(alpha, (int, float))
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise InvalidModel(f"lora_alpha={str(alpha)[:20]} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise InvalidModel(f"adapters with {key} are not supported yet")
    if config.get("lora_bias"):
        raise InvalidModel("adapters with lora_bias (a trained bias on B) are not supported")
    return AdapterInfo(
        peft_type="LORA",
        r=r,
        alpha=float(alpha),
        target_modules=sorted(target_list),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=kind == DORA,
    )


def check_adapter_shapes(
    adapter: dict[str, TensorInfo],
    base: dict[str, TensorInfo],
    info: AdapterInfo,
    towers: tuple[str, ...] = (),
) -> None:
    """Every adapter tensor must be a part of its type (LoRA A / B, DoRA's magnitude, IA3's
    vector) on a base weight whose shape it fits, and every targeted module must carry
    all of its type's parts. ``towers``: a vision model's module prefixes adapters may not
    touch (only the language model's projections are served)."""
    if not adapter:
        raise InvalidModel("adapter_model.safetensors holds no tensors")
    kind = IA3 if info.peft_type == "IA3" else DORA if info.use_dora else LORA
    config = {"feedforward_modules": info.feedforward_modules}
    r = info.r
    base_keys = {k.lower(): k for k in base}
    found: dict[str, set[str]] = {}
    for key, tensor in adapter.items():
        parsed = tensor_part(key)
        if parsed is None:
            raise InvalidModel(
                f"adapter tensor {key[:100]!r} is not a {SUPPORTED} weight (adapters that "
                "carry full weights, such as resized embeddings, are not supported)"
            )
        module, part = parsed
        if "experts" in module.split(".") or "shared_expert" in module:
            raise InvalidModel(
                f"the adapter puts its weights on mixture-of-experts modules ({module[:100]!r}); "
                "only attention and dense MLP projections can be served"
            )
        if towers and module.startswith(towers):
            raise InvalidModel(
                f"the adapter puts weights on the vision tower ({module[:100]!r}); only "
                "adapters on the language model are served (target its modules only, e.g. "
                "target_modules with a regex on 'language_model')"
            )
        if part in ("eA", "eB"):
            raise InvalidModel(
                f"the adapter puts LoRA on an embedding ({module[:100]!r}); only LoRA on "
                "linear projections (attention, MLP, output head) can be served"
            )
        if part not in PARTS_OF[kind]:
            raise InvalidModel(
                f"adapter tensor {key[:100]!r} does not belong in a {LABELS[kind]} adapter"
            )
        found.setdefault(module, set()).add(part)
        target = base_keys.get(f"{module}.weight".lower())
        if target is None:
            raise InvalidModel(
                f"adapter targets {module[:100]!r}, which the base model does not have"
            )
        out_dim, in_dim = (*base[target].shape, 0, 0)[:2]
        shape = tensor.shape
        expected = {
            "A": (r, in_dim),
            "B": (out_dim, r),
            "M": (out_dim,),
            "L": (1, in_dim) if is_feedforward(config, module) else (out_dim, 1),
        }[part]
        if shape != expected:
            raise InvalidModel(
                f"adapter tensor {key[:100]!r} has shape {list(shape)}, which does not fit "
                f"the base weight {list(base[target].shape)}"
                + (f" with rank {r}" if part in ("A", "B") else f" (expected {list(expected)})")
            )
    for module, parts in found.items():
        missing = PARTS_OF[kind] - parts
        if missing:
            raise InvalidModel(
                f"the {LABELS[kind]} adapter's module {module[:100]!r} lacks its "
                + ", ".join(sorted(PART_NAMES[p] for p in missing))
            )

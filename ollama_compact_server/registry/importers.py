"""Imports a Hugging Face model directory or a PEFT adapter directory into the registry
(safetensors only), recording what the model is in its config blob. No torch here."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import InvalidModel, ModelNotFound, RegistryError
from .manifest import (
    MT_ADAPTER_FILE,
    MT_FILE,
    MT_LICENSE,
    MT_PARAMS,
    MT_SYSTEM,
    MT_TEMPLATE,
    MT_TRAINING,
    POOLING_MODES,
    EmbeddingInfo,
    ModelConfig,
    Quantization,
    check_filename,
)
from .names import ModelName
from .peft import check_adapter_config, check_adapter_shapes
from .store import ModelRecord, ProgressFn, Registry
from .tensors import DTYPE_NAMES, TensorInfo, read_header

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
HF_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",  # a vision model's image processor
    "processor_config.json",
}
# vision-language architectures the engine serves images for (modeling/vision.py), by family
VISION_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_JSON_BYTES = 64 << 20
CONVERT_HINT = (
    "pickle files can run arbitrary code when loaded, so only safetensors is accepted. "
    "Convert once, in an environment you trust: "
    'python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\""
)
ADAPTER_HINT = (
    "pickle files can run arbitrary code when loaded, so only adapter_model.safetensors is "
    "accepted. Re-save it once, in an environment you trust, with "
    "model.save_pretrained(OUT, safe_serialization=True)"
)
LIMITS = {
    "vocab_size": 10_000_000,
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
}


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


def read_json(path: Path, label: str | None = None) -> dict[str, Any]:
    label = label or path.name
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InvalidModel(f"{label} is too large")
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModel(f"{label} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidModel(f"{label} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidModel(f"{label} must be a JSON object")
    return value


# ---------------------------------------------------------------------------- model configs


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def check_hf_config(config: dict[str, Any]) -> None:
    """Refuses configs that would run remote code or allocate absurd amounts of memory."""
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise InvalidModel(
            "config.json asks for custom code (auto_map); remote code is never executed"
        )
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise InvalidModel("config.json has no model_type")
    for scope in (config, text_config(config)):
        for key, limit in LIMITS.items():
            value = scope.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise InvalidModel(f"config.json: {key}={str(value)[:30]} is out of range")


def context_length(config: dict[str, Any]) -> int:
    cfg = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def family_of(model_type: str) -> str:
    return model_type.removesuffix("_text")


def chat_template_from(directory: Path, tokenizer_config: dict[str, Any]) -> str:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cjson = directory / "chat_template.json"
    if cjson.is_file():
        template = read_json(cjson).get("chat_template")
        if isinstance(template, str):
            return template
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        if isinstance(chosen, str):
            return chosen
    return ""


ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert", "modernbert"}
)
"""Model types served as dedicated embedding models (encoders, no generation)."""


POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def embedding_info(directory: Path, config: dict[str, Any]) -> EmbeddingInfo | None:
    """For an encoder: its pooling, from sentence-transformers' modules.json and pooling
    config when present (mean otherwise); None for generative models."""
    if config.get("model_type") not in ENCODER_TYPES or config.get("is_decoder"):
        return None
    pooling_dir = "1_Pooling"
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidModel(f"modules.json is not valid JSON: {exc}") from None
        for module in modules if isinstance(modules, list) else []:
            path = module.get("path") if isinstance(module, dict) else None
            kind = str(module.get("type", "")) if isinstance(module, dict) else ""
            if kind.endswith("Pooling") and isinstance(path, str):
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", path) or path in (".", ".."):
                    raise InvalidModel(f"modules.json names an odd pooling folder {path[:40]!r}")
                pooling_dir = path
    pooling = "mean"
    pooling_file = directory / pooling_dir / "config.json"
    if pooling_file.is_file():
        settings = read_json(pooling_file)
        chosen = [mode for key, mode in POOLING_KEYS.items() if settings.get(key)]
        odd = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v]
        if len(chosen) != 1 or len(odd) != 1:
            raise InvalidModel(
                "the pooling config must choose exactly one of: " + ", ".join(POOLING_MODES)
            )
        pooling = chosen[0]
    return EmbeddingInfo(pooling=pooling)


def capabilities_for(template: str) -> list[str]:
    caps = ["completion"]
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template:
        caps.append("thinking")
    return caps


# ---------------------------------------------------------------------------- HF model dirs


def scan_hf_dir(directory: Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    """The files to import from a model directory, and all of its tensors."""
    if not directory.is_dir():
        raise InvalidModel(f"{directory} is not a directory")
    entries = sorted(p for p in directory.iterdir() if p.is_file())
    weights = [p for p in entries if p.suffix == ".safetensors"]
    pickles = [p for p in entries if p.suffix in PICKLE_SUFFIXES]
    if not weights:
        if pickles:
            raise InvalidModel(f"{pickles[0].name} is a pickle file: {CONVERT_HINT}")
        raise InvalidModel("no *.safetensors weights found")
    for pickled in pickles:
        log.info("ignoring %s: the safetensors weights are imported instead", pickled.name)
    tensors: dict[str, TensorInfo] = {}
    for weight in weights:
        check_filename(weight.name)
        found, _ = read_header(weight)
        duplicated = tensors.keys() & found.keys()
        if duplicated:
            raise InvalidModel(f"tensor {sorted(duplicated)[0]!r} appears in two weight files")
        tensors.update(found)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InvalidModel("model.safetensors.index.json has no weight_map")
        names = {w.name for w in weights}
        missing = {str(f) for f in weight_map.values()} - names
        if missing:
            raise InvalidModel(
                f"model.safetensors.index.json names missing shard {sorted(missing)[0]!r}"
            )
    files = weights + [p for p in entries if p.name in HF_FILES]
    return files, tensors


def import_hf_dir(
    registry: Registry,
    directory: Path,
    name: str | ModelName,
    *,
    template: str | None = None,
    system: str | None = None,
    params: dict[str, Any] | None = None,
    license_text: str | None = None,
    source: dict[str, Any] | None = None,
    aliases: list[str] | None = None,
    parent_model: str = "",
    quantization: Quantization | None = None,
    parameter_count: int | None = None,
    progress: ProgressFn = _noop,
) -> ModelRecord:
    """Imports a Hugging Face model directory (config.json + *.safetensors + tokenizer).
    ``quantization`` and ``parameter_count`` describe a directory whose weights are stored
    compressed (a GGUF file converted near its own grid)."""
    target = ModelName.parse(name) if not isinstance(name, ModelName) else name
    directory = Path(directory)
    progress("reading model files", None, None)
    config = read_json(directory / "config.json")
    check_hf_config(config)
    files, tensors = scan_hf_dir(directory)
    if (
        not (directory / "tokenizer.json").is_file()
        and not (directory / "tokenizer.model").is_file()
    ):
        raise InvalidModel("no tokenizer (tokenizer.json or tokenizer.model) found")
    tokenizer_config = (
        read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer_config.json").is_file()
        else {}
    )
    chat_template = (
        template if template is not None else chat_template_from(directory, tokenizer_config)
    )
    dtypes = Counter(t.dtype for t in tensors.values() for _ in range(1))
    dominant = dtypes.most_common(1)[0][0] if dtypes else "F32"
    cfg = text_config(config)
    architectures = config.get("architectures") or []
    model_type = str(config["model_type"])
    record_aliases = list(aliases or [])
    name_or_path = config.get("_name_or_path")
    if isinstance(name_or_path, str) and name_or_path and not name_or_path.startswith(("/", ".")):
        record_aliases.append(name_or_path)
    if source is None:  # a user's own directory: its folder name identifies the model
        record_aliases.append(directory.resolve().name)
    model_config = ModelConfig(
        kind="model",
        architecture=str(architectures[0]) if architectures else "",
        model_type=model_type,
        family=family_of(model_type),
        families=[family_of(model_type)],
        parameter_count=parameter_count or sum(t.numel for t in tensors.values()),
        dtype=DTYPE_NAMES.get(dominant, dominant.lower()),
        context_length=context_length(config),
        embedding_length=int(cfg.get("hidden_size") or 0),
        source=source or {"kind": "huggingface", "ref": directory.resolve().name},
        aliases=sorted(set(record_aliases)),
        capabilities=capabilities_for(chat_template),
        parent_model=parent_model,
        quantization=quantization,
    )
    if model_config.architecture in VISION_ARCHITECTURES:
        if not (directory / "preprocessor_config.json").is_file():
            raise InvalidModel(
                f"{model_config.architecture} is a vision model, but the folder has no "
                "preprocessor_config.json (its image processor's settings)"
            )
        model_config.capabilities.append("vision")
    embedding = embedding_info(directory, config)
    if embedding is not None:
        model_config.embedding = embedding
        model_config.capabilities = ["embedding"]
    total = sum(p.stat().st_size for p in files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress("copying model files", done, total)

    with registry.transaction() as txn:
        for path in files:
            txn.add_file(MT_FILE, path, filename=path.name, progress=advance)
        _add_text_layers(txn, chat_template, system, params, license_text)
        progress("writing manifest", None, None)
        record = txn.commit(target, model_config)
    progress("success", None, None)
    return record


def _add_text_layers(
    txn: Any,
    template: str | None,
    system: str | None,
    params: dict[str, Any] | None,
    license_text: str | None,
) -> None:
    if template:
        txn.add_bytes(MT_TEMPLATE, template.encode())
    if system:
        txn.add_bytes(MT_SYSTEM, system.encode())
    if params:
        txn.add_bytes(MT_PARAMS, json.dumps(params, sort_keys=True).encode())
    if license_text:
        txn.add_bytes(MT_LICENSE, license_text.encode())


# ---------------------------------------------------------------------------- PEFT adapters


# A vision-language checkpoint keeps its original layout on disk; transformers 5 names the
# modules at run time (and peft names adapter weights) as below. Pairs: (disk, run time).
RUNTIME_PREFIXES = {
    "qwen2_vl": (("model.", "model.language_model."), ("visual.", "model.visual.")),
    "gemma3": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
    "llava_next": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ),
    "llava": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
}
TOWER_PREFIXES = (
    "model.visual.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.vision_model.",  # Idefics3 / SmolVLM
    "model.connector.",
)


def runtime_names(shapes: dict[str, TensorInfo], family: str | None) -> dict[str, TensorInfo]:
    """A vision-language model's tensor shapes also under their run-time names (the names
    as stored stay: a checkpoint may already use the new layout)."""
    out = dict(shapes)
    for name, info in shapes.items():
        if name.startswith(("model.language_model.", *TOWER_PREFIXES)):
            continue
        for disk, runtime in RUNTIME_PREFIXES.get(family or "", ()):
            if name.startswith(disk):
                out.setdefault(runtime + name[len(disk) :], info)
                break
    return out


def base_tensors(registry: Registry, base: ModelRecord) -> dict[str, TensorInfo]:
    """Shapes of the base model's tensors, read from the stored safetensors headers."""
    shapes: dict[str, TensorInfo] = {}
    for filename, layer in base.manifest.files(MT_FILE).items():
        if filename.endswith(".safetensors"):
            found, metadata = read_header(registry.blobs.path(layer.digest))
            shapes.update(found)
            shapes.update(_compressed_shapes(metadata))
    return shapes


def _compressed_shapes(metadata: dict[str, str]) -> dict[str, TensorInfo]:
    """A compressed model's file records its parent's weight shapes (``ocs.shapes``): an
    adapter made for the parent is checked against them."""
    try:
        recorded = json.loads(metadata.get("ocs.shapes", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {
        str(name): TensorInfo("F32", tuple(shape))
        for name, shape in recorded.items()
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape)
    }


def import_adapter_dir(
    registry: Registry,
    directory: Path,
    name: str | ModelName,
    base: str | ModelName,
    *,
    source: dict[str, Any] | None = None,
    progress: ProgressFn = _noop,
    training: dict[str, Any] | None = None,
) -> ModelRecord:
    """Imports a PEFT adapter directory (LoRA, DoRA or IA3) as a model running on ``base``
    (``training``: the report of a run trained here, stored with it)."""
    target = ModelName.parse(name) if not isinstance(name, ModelName) else name
    directory = Path(directory)
    progress("reading adapter files", None, None)
    if not directory.is_dir():
        raise InvalidModel(f"{directory} is not a directory")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise InvalidModel(f"{pickled[0]} is a pickle file: {ADAPTER_HINT}")
        raise InvalidModel("adapter_model.safetensors is missing")
    config = read_json(directory / "adapter_config.json")
    info = check_adapter_config(config)
    try:
        base_record = registry.get(base)
    except ModelNotFound:
        raise ModelNotFound(
            f"base model '{ModelName.parse(base) if isinstance(base, str) else base}' not found"
        ) from None
    if base_record.is_adapter:
        raise InvalidModel(
            f"'{base_record.name.display()}' is itself an adapter; name its base model"
        )
    adapter_tensors, _ = read_header(weights)
    family = VISION_ARCHITECTURES.get(base_record.config.architecture)
    shapes = runtime_names(base_tensors(registry, base_record), family)
    check_adapter_shapes(adapter_tensors, shapes, info, TOWER_PREFIXES if family else ())
    base_config = base_record.config
    model_config = ModelConfig(
        kind="adapter",
        architecture=base_config.architecture,
        model_type=base_config.model_type,
        family=base_config.family,
        families=base_config.families,
        parameter_count=sum(t.numel for t in adapter_tensors.values()),
        dtype=base_config.dtype,
        quantization=base_config.quantization,
        context_length=base_config.context_length,
        embedding_length=base_config.embedding_length,
        source=source or {"kind": "peft", "ref": str(config.get("base_model_name_or_path") or "")},
        parent_model=base_record.name.display(),
        base_model=base_record.name.display(),
        base_digest=base_record.digest,
        adapter=info,
        capabilities=base_config.capabilities,
    )
    with registry.transaction() as txn:
        for filename in ADAPTER_FILES:
            txn.add_file(MT_ADAPTER_FILE, directory / filename, filename=filename)
        # The adapter model runs with its base's template, system prompt, defaults and license.
        for layer in base_record.manifest.layers:
            if layer.media_type in (MT_TEMPLATE, MT_SYSTEM, MT_PARAMS, MT_LICENSE):
                txn.add_existing(layer)
        if training is not None:
            txn.add_bytes(MT_TRAINING, json.dumps(training, sort_keys=True).encode())
        progress("writing manifest", None, None)
        record = txn.commit(target, model_config)
    progress("success", None, None)
    return record


def find_base(registry: Registry, reference: str) -> ModelRecord | None:
    """The registry model that an adapter's ``base_model_name_or_path`` refers to, matched
    against registry names and recorded aliases; None when absent or ambiguous."""
    wanted = reference.strip().lower().rstrip("/")
    if not wanted:
        return None
    tail = wanted.rsplit("/", 1)[-1]
    try:
        as_name: ModelName | None = ModelName.parse(reference)
    except RegistryError:
        as_name = None
    if as_name is not None and registry.exists(as_name):
        record = registry.get(as_name)
        if not record.is_adapter:
            return record
    matches = []
    for record in registry.models():
        if record.is_adapter:
            continue
        names = {record.name.display().lower(), *(a.lower() for a in record.config.aliases)}
        ref = record.config.source.get("ref")
        if isinstance(ref, str) and ref:
            names.add(ref.lower())
        if wanted in names or tail in {n.rsplit("/", 1)[-1] for n in names}:
            matches.append(record)
    return matches[0] if len(matches) == 1 else None

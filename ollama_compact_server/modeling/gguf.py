"""Converts a GGUF file into a model directory for the registry, tensor by tensor.

By default the weights stay near the grid they ship on: 4-bit types whose codes our int4
layout holds (Q4_0, Q4_1, Q4_K: asymmetric groups of 32) keep their codes, with each group's
scale and zero rounded to bf16; every other quantized matrix (Q8_0, Q5_x, Q6_K, Q2_K, ...)
is expanded and re-quantized to int8 per output channel, which is finer than any of those
types (its step is the row's largest weight / 127). Matrices shipped as float, norms and
biases stay float. The result is a compressed model of scheme ``gguf`` (sized near the
file) served by the packed kernels. ``dequantize=True`` expands everything to float32
instead, the way transformers loads a GGUF file.

Each tensor is read from the memory-mapped file as it is converted, so memory follows the
tensors really present; a file whose tensors do not match what its architecture needs
(missing, extra or wrongly shaped) is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..registry.errors import InvalidModel
from .memory import check_memory

log = logging.getLogger(__name__)

Progress = Callable[[str, int | None, int | None], None]
ROW_CHUNK = 16384  # rows converted at a time: a vocabulary-sized table stays bounded
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """A few identifying GGUF keys (architecture, name, file type), read without tensors."""
    from .gguf_file import read_table

    return _identity(read_table(Path(path)).metadata)


def _identity(metadata: dict[str, Any]) -> dict[str, object]:
    wanted = (
        "general.architecture",
        "general.name",
        "general.basename",
        "general.size_label",
        "general.file_type",
    )
    return {k: metadata[k] for k in wanted if k in metadata and not isinstance(metadata[k], tuple)}


def file_type_name(value: object) -> str:
    """GGUF's ``general.file_type`` as Ollama shows it (15 -> "Q4_K_M")."""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return ""


@dataclass
class Converted:
    """What a conversion wrote, for the registry entry."""

    metadata: dict[str, object]
    parameters: int = 0  # weights of the model (before compression)
    compressed: bool = False
    level: str = ""  # the file's quantization as Ollama names it (Q4_K_M)
    source_types: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors
    stored: dict[str, int] = field(default_factory=dict)  # our kind -> modules


def convert_gguf(
    path: Path,
    out_dir: Path,
    *,
    dequantize: bool = False,
    progress: Progress | None = None,
) -> Converted:
    """Writes config.json, model.safetensors, the generation config and the tokenizer of a
    GGUF file into ``out_dir`` (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path} is not a file")
    say = progress or (lambda *_: None)
    from .gguf_file import read_table

    table = read_table(path)
    metadata = _identity(table.metadata)
    with tempfile.TemporaryDirectory(prefix="ocs-gguf-") as scratch:
        # transformers wants a directory plus a file name; a link keeps the big file in place.
        link = Path(scratch) / path.name
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
        say("reading GGUF metadata", None, None)
        try:
            config, tokenizer, processor = _hf_side(scratch, path.name, link, metadata)
        except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
            raise InvalidModel(f"{path.name} could not be converted: {exc}") from None
    result = Converted(metadata=metadata, level=file_type_name(metadata.get("general.file_type")))
    tensors, specs, shapes = _convert_tensors(table, config, processor, dequantize, result, say)
    say("writing safetensors", None, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    if specs:
        from ..compress.format import FORMAT_KEY, FORMAT_VERSION, MODULES_KEY, SHAPES_KEY, specs_to
        from ..compress.schemes import GGUF

        result.compressed = True
        file_metadata = {
            FORMAT_KEY: FORMAT_VERSION,
            MODULES_KEY: specs_to(specs),
            SHAPES_KEY: json.dumps(shapes, sort_keys=True),
            "ocs.scheme": GGUF.name,
            "ocs.parent": "",
        }
    else:
        file_metadata = {"format": "pt"}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata=file_metadata)
    hf = config.to_dict()
    hf.pop("quantization_config", None)
    hf["dtype"] = "float32"
    hf["architectures"] = [_architecture(config)]
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    _generation_config(config, out_dir)
    tokenizer.save_pretrained(out_dir)
    return result


def _hf_side(
    scratch: str, filename: str, link: Path, metadata: dict[str, object]
) -> tuple[Any, Any, Any]:
    """The Hugging Face config, tokenizer and GGUF tensor processor of the file (the file's
    metadata is parsed by transformers once, for the config)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        load_gguf_checkpoint,
    )
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    parsed = load_gguf_checkpoint(str(link), return_tensors=False)
    config = AutoConfig.for_model(**parsed["config"])
    # the tokenizer class itself reads the vocabulary with transformers' fast GGUF reader
    # (AutoTokenizer would parse the whole file again for a config)
    tokenizer_class: Any = TOKENIZER_MAPPING.get(type(config), None)
    if isinstance(tokenizer_class, tuple):  # older transformers: (slow, fast)
        tokenizer_class = tokenizer_class[1] or tokenizer_class[0]
    if tokenizer_class is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=filename)
    else:
        tokenizer = tokenizer_class.from_pretrained(scratch, gguf_file=filename)
    architecture = str(metadata.get("general.architecture", ""))
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    return config, tokenizer, processor


def _architecture(config: Any) -> str:
    from transformers import AutoModelForCausalLM

    mapping: Any = AutoModelForCausalLM._model_mapping
    return str(mapping[type(config)].__name__)


def _generation_config(config: Any, out_dir: Path) -> None:
    from transformers import GenerationConfig

    with contextlib.suppress(Exception):  # a config without generation fields has none
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def _convert_tensors(
    table: Any,
    config: Any,
    processor: Any,
    dequantize: bool,
    result: Converted,
    say: Progress,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    import torch
    from torch import nn
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from ..compress.format import ModuleSpec

    model = _meta_model(config)
    mapping = get_gguf_hf_weights_map(model, processor)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(embed)]
    head_name = names.get(id(head)) if head is not None else None
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = bool(getattr(config, "tie_word_embeddings", False)) or (
        head is not None and "output.weight" not in {t.name for t in table.tensors}
    )
    if tied and head_name:
        expected.pop(f"{head_name}.weight", None)

    # first the plan: every tensor named, shaped and present as the architecture needs, and
    # what converting it will hold in memory, before anything is allocated
    plan: list[tuple[Any, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for entry in table.tensors:
        hf_name = mapping.get(entry.name)
        want = expected.get(hf_name) if hf_name is not None else None
        if hf_name is not None and want is None and tied and hf_name == f"{head_name}.weight":
            continue  # a tied head stored anyway: the embedding serves it
        if hf_name is None or want is None:
            raise InvalidModel(
                f"the GGUF file has a tensor {entry.name[:80]!r} its architecture lacks"
            )
        if tuple(entry.shape) != want:
            raise InvalidModel(
                f"GGUF tensor {entry.name[:80]!r} has shape {list(entry.shape)}, but the "
                f"architecture needs {list(want)}"
            )
        if hf_name in seen:
            raise InvalidModel(f"the GGUF file holds {entry.name[:80]!r} twice")
        seen.add(hf_name)
        plan.append((entry, hf_name, want))
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in expected if k not in seen and k not in buffers]
    if missing:
        raise InvalidModel(
            f"the GGUF file lacks {len(missing)} tensor(s) its architecture needs, "
            f"e.g. {missing[0][:80]!r}"
        )
    needed = sum(_converted_bytes(e, n, w, dequantize, linears, embed_name) for e, n, w in plan)
    check_memory(needed, f"converting {table.path.name}")

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, ModuleSpec] = {}
    shapes: dict[str, list[int]] = {}
    total = len(plan)
    for index, (entry, hf_name, want) in enumerate(plan):
        tensor = _Tensor(entry, table)
        kind = entry.kind
        result.source_types[kind] = result.source_types.get(kind, 0) + 1
        say(f"converting {tensor.name}", index, total)
        module = hf_name.rsplit(".", 1)[0]
        result.parameters += int(np.prod(want))
        compressible = _compressible(hf_name, want, linears, embed_name)
        if dequantize or not compressible or kind in FLOAT_TYPES:
            weights = _processed(processor, tensor, _dequantized(tensor, 0, want[0]))
            tensors[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32))
            tensors[hf_name] = tensors[hf_name].reshape(want)
            continue
        n, k = want
        shapes[hf_name] = [n, k]
        if kind in INT4_TYPES and k % 32 == 0:
            stored = _int4(tensor, processor, n, k)
            spec = ModuleSpec("int4", k, n, group_size=32, embedding=module == embed_name)
        else:
            stored = _int8(tensor, processor, n, k)
            spec = ModuleSpec("int8", k, n, embedding=module == embed_name)
        result.stored[spec.kind] = result.stored.get(spec.kind, 0) + 1
        specs[module] = spec
        for key, value in stored.items():
            tensors[f"{module}.{key}"] = value.contiguous()
    if tied and head_name and embed_name in specs:
        n, k = expected[f"{embed_name}.weight"]
        specs[head_name] = ModuleSpec("tied", k, n, source=embed_name)
    return tensors, specs, shapes


def _compressible(hf_name: str, want: tuple[int, ...], linears: set[str], embed: str) -> bool:
    module = hf_name.rsplit(".", 1)[0]
    matrix = hf_name.endswith(".weight") and len(want) == 2
    return matrix and (module in linears or module == embed)


def _converted_bytes(
    entry: Any,
    hf_name: str,
    want: tuple[int, ...],
    dequantize: bool,
    linears: set[str],
    embed: str,
) -> int:
    """Bytes the converted tensor holds in memory until the file is written, with the
    float32 rows of one chunk expanded on the way (an upper bound, not an estimate)."""
    elements = int(np.prod(want, dtype=np.float64))
    if dequantize or not _compressible(hf_name, want, linears, embed) or entry.kind in FLOAT_TYPES:
        return 4 * elements
    n, k = want
    return n * k + 8 * n + 4 * min(n, ROW_CHUNK) * k  # int8 codes (or less), scales, a chunk


class _Tensor:
    """One tensor of the table with its memory-mapped bytes (what the helpers below read)."""

    def __init__(self, entry: Any, table: Any) -> None:
        self.name = entry.name
        self.tensor_type = entry.qtype
        self.data = table.data(entry)


def _dequantized(tensor: Any, start: int, stop: int) -> np.ndarray:
    from gguf import dequantize

    rows = tensor.data if tensor.data.ndim == 1 else tensor.data[start:stop]
    return np.asarray(dequantize(rows, tensor.tensor_type), dtype=np.float32)


def _processed(processor: Any, tensor: Any, weights: np.ndarray) -> np.ndarray:
    """Applies the architecture's GGUF tensor processor (norm offsets, q/k permutation)."""
    return np.asarray(processor.process(weights=weights, name=tensor.name).weights)


def _row_order(processor: Any, tensor: Any, n: int) -> np.ndarray | None:
    """The row permutation the processor applies to this matrix (llama's q/k rope order),
    found by running it on row numbers; None if it does more than reorder rows."""
    probe = np.arange(n, dtype=np.float64).reshape(n, 1)
    out = np.asarray(processor.process(weights=probe, name=tensor.name).weights).reshape(-1)
    order = out.astype(np.int64)
    if out.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        return None
    if not np.array_equal(order.astype(np.float64), out):
        return None
    return order


def _int8(tensor: Any, processor: Any, n: int, k: int) -> dict[str, Any]:
    """Expanded and re-quantized per output channel, in row chunks."""
    import torch

    from ..compress import quant

    order = _row_order(processor, tensor, n)
    qweight = torch.empty((n, k), dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.bfloat16)
    if order is None:  # the processor changes values: expand the whole matrix first
        weights = _processed(processor, tensor, _dequantized(tensor, 0, n))
        stored = quant.quantize_int8(torch.from_numpy(np.ascontiguousarray(weights)))
        return stored
    for start in range(0, n, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, n)
        block = torch.from_numpy(_dequantized(tensor, start, stop).reshape(stop - start, k))
        part = quant.quantize_int8(block)
        qweight[start:stop] = part["qweight"]
        scales[start:stop] = part["scales"]
    if not np.array_equal(order, np.arange(n)):
        index = torch.from_numpy(order)
        qweight, scales = qweight[index], scales[index]
    return {"qweight": qweight, "scales": scales}


def _int4(tensor: Any, processor: Any, n: int, k: int) -> dict[str, Any]:
    """The file's own 4-bit codes, with (scale, zero) per group of 32 such that
    w = (code - 8) * scale + zero, as our int4 layout stores them."""
    import torch

    from ..compress import quant

    codes, scale, zero = _int4_groups(tensor, n, k)
    order = _row_order(processor, tensor, n)
    if order is None:  # the processor changes values: re-quantize what it makes
        weights = _processed(processor, tensor, _dequantized(tensor, 0, n))
        return quant.quantize_int4(torch.from_numpy(np.ascontiguousarray(weights)), 32)
    if not np.array_equal(order, np.arange(n)):
        codes, scale, zero = codes[order], scale[order], zero[order]
    return quant.pack_int4(
        torch.from_numpy(codes.astype(np.int32)),
        torch.from_numpy(scale),
        torch.from_numpy(zero),
    )


def _int4_groups(tensor: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes uint8 [N, K] in 0..15 and scale / zero float32 [N, K/32] of a Q4_0, Q4_1 or
    Q4_K matrix (the block layouts of ggml's quants)."""
    data = np.asarray(tensor.data).reshape(n, -1)
    kind = tensor.tensor_type.name
    if kind == "Q4_K":
        from gguf.quants import Q4_K

        blocks = data.reshape(-1, 144)  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 qs
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(
            1, 1, 2, 1
        )
        codes = (qs & 0x0F).reshape(-1, 256)
        scale = d * sc.astype(np.float32)  # [blocks, 8]: one per sub-block of 32
        low = dmin * mins.astype(np.float32)
        zero = 8 * scale - low  # w = scale * q - low = (q - 8) * scale + zero
    else:
        size = 18 if kind == "Q4_0" else 20
        blocks = data.reshape(-1, size)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, size - 16 :]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # low nibbles first
        scale = d
        if kind == "Q4_0":  # w = d * (q - 8)
            zero = np.zeros_like(d)
        else:  # Q4_1: w = d * q + m
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            zero = m + 8 * d
    return (
        codes.reshape(n, k).astype(np.uint8),
        scale.reshape(n, k // 32).astype(np.float32),
        zero.reshape(n, k // 32).astype(np.float32),
    )


def types_summary(result: Converted) -> str:
    parts = Counter(result.source_types)
    return ", ".join(f"{count} {kind}" for kind, count in parts.most_common())

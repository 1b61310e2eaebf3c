"""GGUF imports on tiny files written the way llama.cpp writes them: weights kept near their
own grid (4-bit codes as they are, other types re-quantized to int8) or expanded to float32,
llama's q / k order and Gemma's norm offsets undone, the tokenizer rebuilt, malformed files
refused before anything is allocated, and such a model compressed or created over HTTP."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ollama_compact_server.compress import quant
from ollama_compact_server.compress.format import specs_from
from ollama_compact_server.jobs.importing import import_path
from ollama_compact_server.modeling.gguf import _int4_groups
from ollama_compact_server.modeling.gguf_file import read_table
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.manifest import MT_FILE
from ollama_compact_server.registry.store import Registry
from tests.conftest import tree_hash
from tests.factory import make_tiny_gguf
from tests.reliability import record

TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "ffn_up": "Q5_0", "ffn_down": "F16"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        f: make_tiny_gguf(root / f"{f}.gguf", f, types=TYPES) for f in ("llama", "qwen2", "gemma3")
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def stored_weights(registry: Registry, name: str) -> dict[str, torch.Tensor]:
    """Every weight of a registry model as float: compressed modules dequantized."""
    record = registry.get(name)
    path = registry.blobs.path(record.manifest.files(MT_FILE)["model.safetensors"].digest)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if "ocs.modules" not in metadata:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith(("qweight", "scales", "zeros"))}
    for module, spec in specs_from(json.loads(metadata["ocs.modules"])).items():
        if spec.kind == "int8":
            out[f"{module}.weight"] = quant.dequantize_int8(
                {"qweight": tensors[f"{module}.qweight"], "scales": tensors[f"{module}.scales"]}
            )
        elif spec.kind == "int4":
            t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "scales_zeros")}
            out[f"{module}.weight"] = quant.dequantize_int4(t, spec.out_features)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_native_and_expanded_imports_hold_the_files_weights(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]], family: str
) -> None:
    path, hf_dir = ggufs[family]
    registry = Registry(tmp_path / "registry")
    native = import_path(registry, path, "tiny:native")
    expanded = import_path(registry, path, "tiny:f32", dequantize=True)
    assert native.config.quantization is not None
    assert native.config.quantization.scheme == "gguf"
    assert native.config.quantization_level == "Q8_0"  # the file's own general.file_type
    assert native.config.quantization.options["stored"] == {
        "int4": 4,  # q (Q4_0) and k (Q4_1) of both layers: their codes as shipped
        "int8": 10 if family == "llama" else 9,  # the rest but F16 down, and the embedding
    }
    assert expanded.config.quantization is None
    original = load_file(str(hf_dir / "model.safetensors"))
    assert native.config.parameter_count == expanded.config.parameter_count
    assert native.config.parameter_count == sum(
        v.numel() for k, v in original.items() if not (family != "llama" and k == "lm_head.weight")
    )
    assert native.size < 0.5 * expanded.size
    float_weights = stored_weights(registry, "tiny:f32")
    native_weights = stored_weights(registry, "tiny:native")
    for key, value in float_weights.items():
        # the expansion is the file's weights: near the originals (a wrong q / k order or a
        # missed Gemma norm offset would be far off), F16 matrices almost exactly
        tolerance = 1e-3 if "down_proj" in key else 0.12
        assert rel(value, original[key]) < tolerance, key
        # the native import is the expansion up to bf16 scales (int4) or an int8 re-rounding
        assert rel(native_weights[key], value) < (6e-3 if value.ndim == 2 else 1e-7), key
    if family != "gemma3":  # (a gemma GGUF's tokenizer is sentencepiece; this one is BPE)
        ours = load_tokenizer(registry, native)
        text = "hello world, the cat sat on the mat 123"
        from transformers import AutoTokenizer

        assert ours(text)["input_ids"] == AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]


def test_the_native_model_runs_near_its_expansion(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]]
) -> None:
    registry = Registry(tmp_path / "registry")
    path, _ = ggufs["llama"]
    native = load_causal_lm(registry, import_path(registry, path, "n"), dtype=torch.float32)
    expanded = load_causal_lm(
        registry, import_path(registry, path, "f", dequantize=True), dtype=torch.float32
    )
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        a, b = native(ids).logits, expanded(ids).logits
    assert rel(a, b) < 0.1


def test_q4_k_blocks_keep_their_codes() -> None:
    """Q4_K (256-value super-blocks, 6-bit scales and mins per 32) as (code - 8) * scale +
    zero per group of 32: the same values gguf's own dequantizer gives."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    n, k = 3, 512
    blocks = rng.integers(0, 256, size=(n * k // 256, 144), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(blocks.shape[0], 2)).astype(np.float16)
    blocks[:, 0:4] = scales.view(np.uint8).reshape(-1, 4)
    data = blocks.reshape(n, -1)

    class Tensor:
        tensor_type = GGMLQuantizationType.Q4_K

    tensor = Tensor()
    tensor.data = data  # type: ignore[attr-defined]
    codes, scale, zero = _int4_groups(tensor, n, k)
    assert codes.max() <= 15
    ours = (codes.astype(np.float32).reshape(n, -1, 32) - 8) * scale[..., None] + zero[..., None]
    theirs = dequantize(data, GGMLQuantizationType.Q4_K).reshape(n, -1, 32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_compressing_and_merging_an_imported_gguf_model(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]]
) -> None:
    """Other schemes and adapter merges start from the expansion of the file's weights."""
    from ollama_compact_server.jobs.compressing import compress_registry_model
    from ollama_compact_server.jobs.merge import merge_adapter
    from tests.factory import make_lora_adapter

    registry = Registry(tmp_path / "registry")
    path, hf_dir = ggufs["llama"]
    import_path(registry, path, "tiny")
    small = compress_registry_model(registry, "tiny", "tiny:int4", "int4", {"method": "rtn"})
    assert small.config.quantization is not None and small.config.quantization.scheme == "int4"
    assert small.config.parent_model == "tiny:latest"
    adapter_dir = make_lora_adapter(hf_dir, tmp_path / "lora", base_name="tiny")
    import_path(registry, adapter_dir, "tiny-lora", base="tiny")
    merged = merge_adapter(registry, "tiny-lora", "tiny-merged")
    assert merged.config.quantization is None
    model = load_causal_lm(registry, merged, dtype=torch.float32)
    assert model(torch.tensor([[2, 40, 41]])).logits.isfinite().all()


# ------------------------------------------------------------------------------ bad files


def patched(source: Path, target: Path, edit) -> Path:
    data = bytearray(source.read_bytes())
    edit(data)
    target.write_bytes(bytes(data))
    return target


def test_malformed_files_are_refused_before_anything_is_written(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]]
) -> None:
    path, _ = ggufs["llama"]
    registry = Registry(tmp_path / "registry")
    registry.root.mkdir(parents=True)
    before = tree_hash(registry.root)
    table = read_table(path)
    first = table.tensors[0]
    cases = {
        "truncated.gguf": lambda d: d.__delitem__(slice(len(d) - 4096, len(d))),
        "not-gguf.gguf": lambda d: d.__setitem__(slice(0, 4), b"GGUX"),
        "huge-count.gguf": lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 40)),
    }
    for filename, edit in cases.items():
        bad = patched(path, tmp_path / filename, edit)
        with pytest.raises(InvalidModel):
            import_path(registry, bad, "bad")
        assert tree_hash(registry.root) == before, filename
    assert first.nbytes > 0
    record("Malformed GGUF files (truncated, bad magic, huge counts)", "tests/test_gguf.py", 3)


def test_a_file_lacking_tensors_or_declaring_other_shapes_is_refused(tmp_path: Path) -> None:
    """A file whose header declares a bigger model than its tensors make (the attack that
    made 2 GB of random weights from a 239 KB upload) is refused, nothing allocated."""
    from gguf import GGUFReader, GGUFWriter

    source, _ = make_tiny_gguf(tmp_path / "full.gguf", "llama")
    reader = GGUFReader(str(source))
    registry = Registry(tmp_path / "registry")

    def rewrite(target: Path, *, drop: str = "", blocks: int | None = None) -> Path:
        writer = GGUFWriter(str(target), "llama")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value = field.contents()
            if key == "llama.block_count" and blocks is not None:
                value = blocks
            writer.add_key_value(
                key, value, field.types[0], field.types[-1] if len(field.types) > 1 else None
            )
        for tensor in reader.tensors:
            if drop and tensor.name.startswith(drop):
                continue
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return target

    steps: list[str] = []

    def progress(status: str, *_: object) -> None:
        steps.append(status)

    with pytest.raises(InvalidModel, match="lacks"):
        import_path(
            registry, rewrite(tmp_path / "no-layer.gguf", drop="blk.1."), "x", progress=progress
        )
    with pytest.raises(InvalidModel, match="lacks"):  # declares 8 blocks, holds 2
        import_path(registry, rewrite(tmp_path / "eight.gguf", blocks=8), "x", progress=progress)
    assert not registry.names()
    assert steps and not [s for s in steps if s.startswith("converting")]  # checked first
    record("GGUF declaring more than it holds, or more than memory", "tests/test_gguf.py", 2)


def test_a_file_bigger_than_memory_allows_is_refused_before_converting(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ollama_compact_server.modeling import memory

    path, _ = ggufs["llama"]
    registry = Registry(tmp_path / "registry")
    steps: list[str] = []
    monkeypatch.setattr(memory, "available_ram", lambda: 64 * 1024)
    with pytest.raises(InvalidModel, match="GiB of memory"):
        import_path(registry, path, "x", dequantize=True, progress=lambda s, *_: steps.append(s))
    assert not [s for s in steps if s.startswith("converting")]
    assert not registry.names()
    record("GGUF declaring more than it holds, or more than memory", "tests/test_gguf.py", 1)
    assert memory.available_ram() > 0 and memory.check_memory(1, "x") is None


# ------------------------------------------------------------------------------ over HTTP


async def test_create_from_an_uploaded_gguf_keeps_it_compact(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]]
) -> None:
    """`ollama create` with a GGUF: the model is sized near the file, /api/show names its
    quantization as Ollama does, and it can be compressed further with -q."""
    from tests.conftest import serve_app
    from tests.fakes import FakeEngine

    path, _ = ggufs["qwen2"]
    registry = Registry(tmp_path / "registry")
    async with serve_app(registry, FakeEngine()) as served:
        digest = await served.ollama.create_blob(path)
        await served.ollama.create(model="fromgguf", files={"model.gguf": digest})
        shown = await served.ollama.show("fromgguf")
        assert shown.details.quantization_level == "Q8_0"
        tags = (await served.raw.get("/api/tags")).json()["models"]
        size = next(m["size"] for m in tags if m["name"] == "fromgguf:latest")
        assert size < 2 * path.stat().st_size


def test_an_earlier_float_import_of_the_default_model_is_redone_compact() -> None:
    """An earlier version stored the bundled model expanded to float32 (1.1 GB): such an
    automatic import is redone in the compact form; a model the user made is left alone."""
    from ollama_compact_server.jobs.default_model import PACKAGE, _outdated
    from ollama_compact_server.registry.manifest import ModelConfig, Quantization

    class Record:
        def __init__(self, config: ModelConfig) -> None:
            self.config = config

    pypi = {"kind": "pypi", "ref": PACKAGE}
    assert _outdated(Record(ModelConfig(source=pypi)))  # type: ignore[arg-type]
    compact = ModelConfig(source=pypi, quantization=Quantization(scheme="gguf"))
    assert not _outdated(Record(compact))  # type: ignore[arg-type]
    users = ModelConfig(source={"kind": "gguf", "ref": "gemma.gguf"})
    assert not _outdated(Record(users))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_expansion_used_by_other_workflows_computes_what_the_model_serves(
    tmp_path: Path, ggufs: dict[str, tuple[Path, Path]], family: str
) -> None:
    """Compressing with another scheme and merging start from the compressed model expanded
    to float modules: it must compute what the compressed modules compute (Gemma's scaled
    embedding once re-drew its table while its scale buffer was made)."""
    registry = Registry(tmp_path / "registry")
    record = import_path(registry, ggufs[family][0], "tiny")
    served = load_causal_lm(registry, record, dtype=torch.float32)
    expanded = load_causal_lm(registry, record, dtype=torch.float32, dequantize=True)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        # the served int8 and int4 kernels quantize activations (a few percent on a tiny
        # random model); a re-drawn or misplaced table is off by about 100%
        assert rel(expanded(ids).logits, served(ids).logits) < 0.1

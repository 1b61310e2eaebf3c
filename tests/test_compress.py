"""Compression: quantizer error bounds and packed layouts, runtime modules against float
references, every scheme end to end on tiny models, and the typed errors for bad requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ollama_compact_server.compress import quant
from ollama_compact_server.compress.format import ModuleSpec
from ollama_compact_server.compress.schemes import SchemeError, resolve
from ollama_compact_server.jobs.compressing import compress_registry_model
from ollama_compact_server.modeling.loader import load_causal_lm
from ollama_compact_server.modeling.quantized import Int4Linear, Int8Linear, QuantEmbedding
from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import tree_hash


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02


def test_int8_error_bound(weight: torch.Tensor) -> None:
    t = quant.quantize_int8(weight)
    assert t["qweight"].dtype == torch.int8 and t["scales"].shape == (128,)
    # per-channel rounding error is at most half a step
    step = t["scales"].float()[:, None]
    assert ((quant.dequantize_int8(t) - weight).abs() <= step / 2 + 1e-7).all()
    assert rel(quant.dequantize_int8(t), weight) < 0.01


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_layout_matches_torch_kernel(weight: torch.Tensor, group: int) -> None:
    """The stored layout is torch's 64-row CPU packing (what it makes on AVX512 CPUs; on
    AVX2 it packs 32-row blocks, and the module repacks for its fallback kernel)."""
    t = quant.quantize_int4(weight, group)
    codes = quant.unpack_int4_rows(t["qweight"], torch.arange(128)).to(torch.int32)
    theirs = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(t["qweight"], theirs) == quant.torch_cpu_int4_layout()
    deq = quant.dequantize_int4(t, 128)
    assert rel(deq, weight) < (0.12 if group == 128 else 0.1)
    x = torch.randn(5, 256)
    y = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), theirs, group, t["scales_zeros"])
    assert rel(y, F.linear(x, deq)) < 0.01


def test_int4_pads_rows_to_the_kernel_block() -> None:
    w = torch.randn(100, 64)
    t = quant.quantize_int4(w, 32)
    assert t["qweight"].shape == (128, 32)
    assert rel(quant.dequantize_int4(t, 100), w) < 0.1


def test_int2_runs_exactly_as_int4(weight: torch.Tensor) -> None:
    t = quant.quantize_int2(weight, 32)
    as4 = quant.int2_as_int4(t)
    assert torch.allclose(quant.dequantize_int4(as4, 128), quant.dequantize_int2(t))
    assert rel(quant.dequantize_int2(t), weight) < 0.5


def test_nf4_round_trip(weight: torch.Tensor) -> None:
    t = quant.quantize_nf4(weight, 64)
    assert rel(quant.dequantize_nf4(t), weight) < 0.12


def test_activation_weighted_clipping_helps_important_channels(weight: torch.Tensor) -> None:
    importance = torch.ones(256)
    importance[:8] = 100.0
    plain = quant.dequantize_int4(quant.quantize_int4(weight, 32), 128)
    weighted = quant.dequantize_int4(quant.quantize_int4(weight, 32, importance), 128)
    err = lambda d: float((((d - weight) ** 2).sum(0) * importance).sum())  # noqa: E731
    assert err(weighted) <= err(plain)


def test_runtime_linears_match_dequantized_reference(weight: torch.Tensor) -> None:
    x = torch.randn(3, 7, 256)
    spec8 = ModuleSpec("int8", 256, 128)
    t8 = quant.quantize_int8(weight)
    lin8 = Int8Linear(t8, spec8, None)
    assert lin8.in_features == 256 and lin8.out_features == 128
    assert rel(lin8(x), F.linear(x, quant.dequantize_int8(t8))) < 0.01
    spec4 = ModuleSpec("int4", 256, 128, group_size=32)
    t4 = quant.quantize_int4(weight, 32)
    lin4 = Int4Linear(t4, spec4, torch.ones(128))
    ref = F.linear(x, quant.dequantize_int4(t4, 128), torch.ones(128))
    assert lin4(x).shape == (3, 7, 128) and rel(lin4(x), ref) < 0.01
    assert not any(n == "weight" for n, _ in lin4.named_parameters())
    ids = torch.tensor([[0, 5, 127]])
    emb = QuantEmbedding(lin4, 2.0, None)
    assert torch.allclose(emb(ids), 2.0 * quant.dequantize_int4(t4, 128)[ids], atol=1e-5)


def test_resolve_maps_ollama_names_and_lists_what_is_supported() -> None:
    assert resolve("q8_0")[0].name == "int8"
    scheme, options = resolve("Q4_K_M")
    assert scheme.name == "mixed" and options["target"] == 0.22
    assert resolve("int4", {"group_size": 64})[1]["group_size"] == 64
    with pytest.raises(SchemeError, match="supported: int8, int4"):
        resolve("q5_k_m")
    with pytest.raises(SchemeError, match=r"supported: 32, 64, 128, 256"):
        resolve("int4", {"group_size": 48})
    with pytest.raises(SchemeError, match="supported options: group_size"):
        resolve("int4", {"bits": 3})
    with pytest.raises(SchemeError, match="out of range"):
        resolve("lowrank", {"energy": 1.5})


@pytest.fixture
def tiny_registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Registry:
    registry = Registry(tmp_path / "registry")
    for family, directory in tiny_models.items():
        import_hf_dir(registry, directory, f"tiny-{family}")
    return registry


IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90]])


def logits(registry: Registry, name: str) -> torch.Tensor:
    model = load_causal_lm(registry, registry.get(name), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2"])
def test_int8_model_round_trip(tiny_registry: Registry, family: str) -> None:
    parent = f"tiny-{family}"
    record = compress_registry_model(tiny_registry, parent, f"{parent}-q8", "q8_0")
    assert record.config.quantization is not None
    assert record.config.quantization.scheme == "int8"
    assert record.config.quantization_level == "INT8"
    assert record.config.parent_model.startswith(parent)
    assert record.size < 0.45 * tiny_registry.get(parent).size
    ref, out = logits(tiny_registry, parent), logits(tiny_registry, f"{parent}-q8")
    assert rel(out, ref) < 0.1
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.6  # near-flat random logits
    model = load_causal_lm(tiny_registry, record, dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear) and q_proj.in_features == 64
    if family != "llama":  # tied: the embedding table serves the head
        assert model.lm_head is model.model.embed_tokens.table


@pytest.mark.parametrize(
    ("scheme", "options", "bound"),
    [
        ("int4", {}, 0.8),
        ("int2", {}, 1.5),
        ("nf4", {"group_size": 32}, 0.9),
        ("lowrank", {"energy": 0.99}, 0.2),
        ("lowrank", {"rank": 8}, 1.5),
        ("prune", {"method": "magnitude", "sparsity": 0.3}, 1.5),
        ("prune", {"pattern": "2:4", "bits": 32}, 1.5),
        ("mixed", {"target": 0.25}, 0.6),
    ],
)
def test_every_scheme_serves(
    tiny_registry: Registry, scheme: str, options: dict, bound: float
) -> None:
    record = compress_registry_model(tiny_registry, "tiny-gemma3", "out", scheme, options)
    assert record.config.quantization is not None
    assert record.config.quantization.options == resolve(scheme, options)[1]
    ref, out = logits(tiny_registry, "tiny-gemma3"), logits(tiny_registry, "out")
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < bound


def test_pruning_zeroes_what_it_says(tiny_registry: Registry) -> None:
    compress_registry_model(
        tiny_registry, "tiny-llama", "p", "prune", {"pattern": "2:4", "bits": 32}
    )
    model = load_causal_lm(tiny_registry, tiny_registry.get("p"), dtype=torch.float32)
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize(
    ("source", "scheme", "options", "message"),
    [
        ("tiny-llama", "q3_k", None, "supported: int8, int4"),
        ("tiny-llama", "int4", {"group_size": 128}, "group sizes that fit this model: 32, 64"),
        ("tiny-llama", "lowrank", {"rank": 40}, "ranks 1..20"),
        ("tiny-llama-q8", "int4", None, "already compressed"),
    ],
)
def test_bad_requests_leave_registry_unchanged(
    tiny_registry: Registry, source: str, scheme: str, options: dict | None, message: str
) -> None:
    compress_registry_model(tiny_registry, "tiny-llama", "tiny-llama-q8", "int8")
    before = tree_hash(tiny_registry.root)
    with pytest.raises(InvalidModel, match=message):
        compress_registry_model(tiny_registry, source, "new", scheme, options)
    assert tree_hash(tiny_registry.root) == before


def test_failure_midway_leaves_registry_unchanged(
    tiny_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tree_hash(tiny_registry.root)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("ollama_compact_server.registry.store.Transaction.commit", boom)
    with pytest.raises(RuntimeError):
        compress_registry_model(tiny_registry, "tiny-llama", "new", "int8")
    assert tree_hash(tiny_registry.root) == before


def test_adapter_made_for_the_parent_runs_on_the_compressed_model(
    tiny_registry: Registry, tiny_adapter: Path
) -> None:
    from ollama_compact_server.registry.importers import import_adapter_dir

    compress_registry_model(tiny_registry, "tiny-llama", "tiny-llama-q8", "int8")
    import_adapter_dir(tiny_registry, tiny_adapter, "lora-f32", "tiny-llama")
    import_adapter_dir(tiny_registry, tiny_adapter, "lora-q8", "tiny-llama-q8")
    base, ref = logits(tiny_registry, "tiny-llama-q8"), logits(tiny_registry, "lora-f32")
    out = logits(tiny_registry, "lora-q8")
    assert rel(base, ref) > 0.3  # the adapter matters ...
    # ... and the compressed base keeps its effect (int8 weights and activations: ~0.1 on
    # this tiny random model, against ~1.3 without the adapter)
    assert rel(out, ref) < 0.15


def test_memory_planner_sizes_a_compressed_model_by_its_scheme(tiny_registry: Registry) -> None:
    from ollama_compact_server.engine.provider import RegistrySizing

    compress_registry_model(tiny_registry, "tiny-llama", "tiny-llama-q4", "int4")
    sizing = RegistrySizing(tiny_registry, dtype=torch.float32, num_parallel=1, context_length=256)
    assert sizing.weight_format("tiny-llama") == "float32"
    assert sizing.weight_format("tiny-llama-q4") == "int4"
    assert sizing.estimate("tiny-llama-q4") < sizing.estimate("tiny-llama")


def test_fisher_diagonal_is_the_sum_of_squared_loss_gradients(tiny_registry: Registry) -> None:
    from ollama_compact_server.compress.calibration import fisher_diagonal

    model = load_causal_lm(tiny_registry, tiny_registry.get("tiny-gemma3"), dtype=torch.float32)
    windows = [torch.tensor([[1, 5, 9, 3, 7, 2]]), torch.tensor([[4, 4, 8, 1]])]
    embed = model.get_input_embeddings().weight  # tied: the head's gradient is in it too
    up = model.model.layers[0].mlp.up_proj.weight
    got = fisher_diagonal(model, windows, {"embed": embed, "up": up})
    expected = {"embed": torch.zeros_like(embed), "up": torch.zeros_like(up)}
    for ids in windows:
        model.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        expected["embed"] += embed.grad**2
        expected["up"] += up.grad**2
    model.zero_grad()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-12)
        assert got[name].sum() > 0
    # the weights' requires_grad flags are as they were, and no gradient is left behind
    assert all(p.grad is None for p in model.parameters())


def test_auto_serves_integer_models_in_float32_on_a_bf16_cpu(
    tiny_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with native bfloat16, OCS_DTYPE=auto serves float models in bfloat16 but
    int8 / int4 models in float32 (what our integer kernels and the C decode step take);
    the planner sizes each one's KV cache in the dtype it gets, and a set dtype wins."""
    from ollama_compact_server.engine import device
    from ollama_compact_server.engine.provider import RegistryProvider, RegistrySizing

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    compress_registry_model(tiny_registry, "tiny-llama", "tiny-llama-q8", "int8")
    cpu = torch.device("cpu")
    assert device.model_dtype("auto", cpu, None) == torch.bfloat16
    assert device.model_dtype("auto", cpu, "int4") == torch.float32
    assert device.model_dtype("bfloat16", cpu, "int8") == torch.bfloat16
    assert device.planned_dtype("auto", "cpu", "gguf") == "float32"
    assert device.planned_dtype("auto", "cuda", "int8") == "bfloat16"
    provider = RegistryProvider(tiny_registry, cpu, "auto")
    compressed, plain = provider("tiny-llama-q8"), provider("tiny-llama")
    assert compressed.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert plain.model.get_input_embeddings().weight.dtype == torch.bfloat16
    sizing = RegistrySizing(
        tiny_registry,
        dtype=torch.bfloat16,
        num_parallel=1,
        context_length=256,
        integer_dtype="float32",
    )
    assert sizing.serving_dtype("tiny-llama-q8") == "float32"
    assert sizing.serving_dtype("tiny-llama") == "bfloat16"
    fixed = RegistryProvider(tiny_registry, cpu, torch.bfloat16)
    assert fixed("tiny-llama-q8").dtype == torch.bfloat16

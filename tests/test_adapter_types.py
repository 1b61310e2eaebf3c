"""DoRA and IA3 adapters beside LoRA: adapters of each type made by peft (and a LoRA saved
without a task_type, whose config carries peft's auto_mapping) import through every path,
serve in the batched engine with greedy tokens equal to peft's generate and logits within
1e-4 of peft's, alone and inside one decode step that mixes every type and bare-base rows,
run on compressed bases, and merge; other PEFT types and broken adapters are refused with a
clear message, without harming other requests."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ollama_compact_server.modeling.lora import LoraBank, LoraError, LoraWeights, read_peft_adapter
from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.factory import make_ia3_adapter, make_lora_adapter
from tests.test_lora import peft_generate, run, start

MAKERS: dict[str, Callable[[Path, Path], Path]] = {
    "lora": lambda base, out: make_lora_adapter(base, out, seed=1, base_name="tiny"),
    "dora": lambda base, out: make_lora_adapter(  # rsLoRA's scale in the norms too
        base, out, r=8, alpha=8, seed=2, use_dora=True, use_rslora=True, base_name="tiny"
    ),
    "ia3": lambda base, out: make_ia3_adapter(base, out, seed=3, base_name="tiny"),
    # IA3 on the input of a projection the compact model fuses (up with gate), and on q
    "ia3_up": lambda base, out: make_ia3_adapter(
        base,
        out,
        seed=5,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        feedforward_modules=["up_proj", "down_proj"],
        base_name="tiny",
    ),
    # what a new user gets from LoraConfig(r=..., target_modules=...) without task_type
    "notask": lambda base, out: make_lora_adapter(
        base,
        out,
        seed=4,
        task_type=None,
        target_modules=["q_proj", "v_proj", "down_proj"],
        base_name="tiny",
    ),
}
KINDS = list(MAKERS)
FAMILIES = ["llama", "gemma3", "qwen2"]  # qwen2: biases on q / k / v (DoRA keeps, IA3 scales)
PROMPTS = [list(range(10, 30)), list(range(40, 47))]
# float32 logits against peft's: 1e-4, the documented figure; the tiny qwen2's logits are
# about twice as large (up to ~35 with an adapter), and even its plain LoRA rows, whose code
# this does not change, sit up to 1.4e-4 from peft's, so it gets twice the room
TOLERANCE = {"llama": 1e-4, "gemma3": 1e-4, "qwen2": 2e-4}


@pytest.fixture(scope="module")
def typed_adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("typed-adapters")
    return {
        (family, kind): make(tiny_models[family], root / f"{family}-{kind}")
        for family in FAMILIES
        for kind, make in MAKERS.items()
    }


def registry_with(root: Path, base: Path, adapters: dict[str, Path], base_name="tiny"):
    registry = Registry(root)
    import_hf_dir(registry, base, base_name)
    for name, directory in adapters.items():
        import_adapter_dir(registry, directory, name, base_name)
    return registry


def read(directory: Path, key: str) -> LoraWeights:
    config = json.loads((directory / "adapter_config.json").read_text())
    return read_peft_adapter(config, directory / "adapter_model.safetensors", key)


def test_saved_configs_are_what_peft_writes(typed_adapters) -> None:
    """The fixtures are the real thing: DoRA magnitudes, IA3 vectors, and the auto_mapping
    peft records without a task_type (which used to be refused as custom code)."""
    configs = {
        kind: json.loads((typed_adapters["llama", kind] / "adapter_config.json").read_text())
        for kind in KINDS
    }
    assert configs["dora"]["use_dora"] is True and configs["ia3"]["peft_type"] == "IA3"
    assert configs["ia3"]["feedforward_modules"] == ["down_proj"]
    assert configs["notask"]["task_type"] is None
    assert configs["notask"]["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_of_every_type_matches_peft_logits(
    tiny_models: dict[str, Path], typed_adapters, family: str
) -> None:
    """In float32, a prefill of one row per type and a bare row, then one decode step of
    the same rows: every row's logits are within 1e-4 of peft's for its own
    adapter (see TOLERANCE)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_compact_server.engine.runner import ModelRunner

    def fresh():
        return AutoModelForCausalLM.from_pretrained(
            tiny_models[family], attn_implementation="sdpa"
        ).eval()

    runner = ModelRunner(
        fresh(), slots=len(KINDS) + 1, capacity=64, dtype=torch.float32, device=torch.device("cpu")
    )
    bank = runner.attach_lora(len(KINDS))
    for slot, kind in enumerate(KINDS):
        bank.load(slot, read(typed_adapters[family, kind], kind))
    prompt = PROMPTS[1]
    rows = [*range(len(KINDS)), -1]
    slots = [runner.cache.allocate() for _ in rows]
    prefill = runner.prefill_batch(slots, [prompt] * len(rows), rows)  # [rows, V]
    token = 77
    decode = runner.decode(slots, [token] * len(rows), [len(prompt)] * len(rows), rows)
    with torch.no_grad():
        bare = fresh()(input_ids=torch.tensor([prompt])).logits[0, -1]
        for row, kind in enumerate([*KINDS, None]):
            model = fresh()
            if kind is not None:
                model = PeftModel.from_pretrained(model, typed_adapters[family, kind]).eval()
            first = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            second = model(input_ids=torch.tensor([[*prompt, token]])).logits[0, -1]
            errors = [float((prefill[row] - first).abs().max())]
            errors.append(float((decode[row] - second).abs().max()))
            assert max(errors) < TOLERANCE[family], (kind, errors)
            if kind is not None:
                assert (first - bare).abs().max() > 0.1, f"{kind} changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
async def test_mixed_types_decode_together_and_equal_solo_and_peft(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters, family: str
) -> None:
    dirs = {kind: typed_adapters[family, kind] for kind in KINDS}
    registry = registry_with(tmp_path / "reg", tiny_models[family], dirs)
    engine = start(registry, slots=16)  # every request of the mixed round at once
    try:
        models = ["tiny", *KINDS]
        solo = {
            (m, i): await run(engine, m, p, n=20) for m in models for i, p in enumerate(PROMPTS)
        }
        for model in models:
            assert solo[model, 0][:10] == peft_generate(
                tiny_models[family], dirs.get(model), PROMPTS[0]
            ), f"{model} differs from peft"
        assert len({tuple(solo[m, 0]) for m in models}) == len(models), "an adapter did nothing"
        runner = engine.device_loop.workers["tiny:latest"].runner
        real = runner.decode
        steps: list[list[int]] = []

        def decode(slots, tokens, positions, loras=None, offsets=None):
            steps.append(list(loras or []))
            return real(slots, tokens, positions, loras)

        runner.decode = decode  # type: ignore[method-assign]
        jobs = [
            (model, i, run(engine, model, prompt, delay=0.001 * n, n=20))
            for n, (model, (i, prompt)) in enumerate(itertools.product(models, enumerate(PROMPTS)))
        ]
        results = await asyncio.gather(*(job for _, _, job in jobs))
        for (model, i, _), tokens in zip(jobs, results):
            assert tokens == solo[model, i], f"{model} prompt {i} differs inside a mixed batch"
        adapters = engine.device_loop.workers["tiny:latest"].adapters
        assert adapters is not None
        slot_of = {kind: adapters.slot_of(registry.get(kind).digest) for kind in KINDS}
        assert all(slot >= 0 for slot in slot_of.values())
        every = {*slot_of.values(), -1}
        assert any(every <= set(step) for step in steps), (
            f"no decode step held every type and a bare row: {steps}"
        )
    finally:
        engine.close()


def reference_generate(model, weights: LoraWeights | None, prompt: list[int]) -> list[int]:
    """Greedy tokens of one request, the adapter applied by forward hooks on the model's
    own (compressed) modules, without the adapter bank: LoRA adds ((x A^T) s) B^T; DoRA
    gives g (y + ((x A^T) s) B^T) + (1 - g) bias with g = m / ||W + s B A||_row over the
    module's dequantized weight; IA3 multiplies the output, or a feedforward module's input,
    by its vector. The operations are the bank's, in its order: the integer CPU kernels
    quantize their input, so a last-bit difference upstream can move a later token."""
    handles = []
    for path in weights.modules if weights is not None else ():
        module = model.get_submodule(path)
        if path in weights.vectors:
            side, vector = weights.vectors[path]
            if side == "in":
                hook = module.register_forward_pre_hook(lambda m, args, v=vector: (args[0] * v,))
            else:
                hook = module.register_forward_hook(lambda m, args, y, v=vector: y * v)
            handles.append(hook)
            continue
        a, b = weights.pairs[path]
        magnitude = weights.magnitudes.get(path)

        def lora(m, args, y, a=a, b=b, s=weights.scale, magnitude=magnitude):
            y = y + ((args[0] @ a.t()) * s) @ b.t()
            if magnitude is None:
                return y
            dense = m.rows(torch.arange(m.out_features), torch.float32)
            g = magnitude / torch.linalg.norm(dense + s * (b @ a), dim=1)
            return g * y + (0.0 if m.bias is None else (1 - g) * m.bias)

        handles.append(module.register_forward_hook(lora))
    try:
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            repetition_penalty=1.0,
        )
    finally:
        for handle in handles:
            handle.remove()
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
async def test_types_on_a_compressed_base(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters, scheme: str
) -> None:
    """Adapters made for the float parent run on its compressed variant, where DoRA's norms
    come from the dequantized weight the compressed modules compute with. Each type changes
    the output; on int8, mixed batches equal solo output and each type's greedy output
    equals an unbatched reference (the adapter as hooks on the same compressed modules, run
    by transformers)."""
    from ollama_compact_server.jobs.compressing import compress_registry_model
    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.modeling.quantized import prepare_for_cpu

    registry = registry_with(tmp_path / "reg", tiny_models["llama"], {})
    compress_registry_model(registry, "tiny", "tiny-q", scheme)
    for kind in KINDS:
        import_adapter_dir(registry, typed_adapters["llama", kind], kind, "tiny-q")
    engine = start(registry)
    try:
        models = ["tiny-q", *KINDS]
        solo = {m: await run(engine, m, PROMPTS[1]) for m in models}
        assert len({tuple(v) for v in solo.values()}) == len(models)
        results = await asyncio.gather(*(run(engine, m, PROMPTS[1]) for m in models * 2))
        for model, tokens in zip(models * 2, results):
            # int4 on the CPU is not batch-invariant, plain LoRA included, before this
            # change too: a bare row decodes in the C step alone and in torch beside an
            # adapter row, and adapter rows' results move with the batch's size; the last
            # bits differ, and the int4 kernels' quantized input turns that into other
            # tokens within a few steps (see the report of the adapters branch)
            if scheme == "int8":
                assert tokens == solo[model], model
        bank = engine.device_loop.workers["tiny-q:latest"].runner.lora
        assert bank is not None
        path = "model.layers.0.mlp.down_proj"
        assert type(bank.layers[path].base).__name__ != "Linear"  # the compressed module
    finally:
        engine.close()
    if scheme == "int4":
        return  # not batch-invariant (above); the factor test covers DoRA's int4 norms
    reference = load_causal_lm(registry, registry.get("tiny-q"), dtype=torch.float32)
    prepare_for_cpu(reference)  # as the engine's provider does on the CPU
    with torch.no_grad():
        for model in models:
            weights = read(typed_adapters["llama", model], model) if model in KINDS else None
            assert solo[model] == reference_generate(reference, weights, PROMPTS[1]), model


def test_dora_factor_uses_the_dequantized_weight(
    tmp_path: Path, tiny_models, typed_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA's per-output factor on an int4 base: magnitude over the row norms of the
    dequantized weight plus the scaled update, as peft computes it on the expanded model."""
    from ollama_compact_server.jobs.compressing import compress_registry_model
    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.modeling.quantized import prepare_for_cpu

    path = "model.layers.1.self_attn.o_proj"
    registry = registry_with(tmp_path / "reg", tiny_models["llama"], {})
    compress_registry_model(registry, "tiny", "tiny-q", "int4")
    compressed = load_causal_lm(registry, registry.get("tiny-q"), dtype=torch.float32)
    prepare_for_cpu(compressed)  # our CPU kernels' layout, as the engine serves it
    released = compressed.get_submodule(path).qweight is None  # with our CPU kernels
    expanded = load_causal_lm(
        registry, registry.get("tiny-q"), dtype=torch.float32, dequantize=True
    )
    weights = read(typed_adapters["llama", "dora"], "dora")
    bank = LoraBank(compressed, 2, torch.float32, torch.device("cpu"))
    bank.load(1, weights)
    a, b = weights.pairs[path]
    weight = expanded.get_submodule(path).weight + weights.scale * (b @ a)
    expected = weights.magnitudes[path] / torch.linalg.norm(weight, dim=1)
    at = bank.layers[path].out_at
    assert at is not None and bank.vectors.store is not None
    factors = bank.vectors.store[:, at : at + expected.numel()]  # [slots + 1, out]
    assert torch.allclose(factors[1], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(factors[0], torch.ones_like(expected))  # other slots: identity
    assert torch.equal(factors[2], torch.ones_like(expected))  # bare rows: identity
    module = compressed.get_submodule(path)
    assert (module.qweight is None) == released, "reading rows kept the stored int4 layout"
    # a module that keeps only its kernel's layout (int4 repacked for CUDA) cannot give
    # rows: its columns are read back through its forward instead
    with monkeypatch.context() as patch:

        def no_rows(*args, **kwargs):
            raise RuntimeError("int4 module without its stored layout cannot look up rows")

        patch.setattr(type(module), "rows", no_rows)
        again = LoraBank(compressed, 2, torch.float32, torch.device("cpu"))
        again.load(0, weights)
    at = again.layers[path].out_at
    assert at is not None and again.vectors.store is not None
    got = again.vectors.store[0, at : at + expected.numel()]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ imports


async def test_every_type_imports_through_every_path(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters, monkeypatch
) -> None:
    """/api/create with adapters, a Modelfile's ADAPTER through `ollama-compact create`, and
    the drop-in folder, for each type."""
    from ollama_compact_server.app import create_app
    from ollama_compact_server.cli import main
    from ollama_compact_server.registry.dropin import register_dropins
    from ollama_compact_server.settings import Settings
    from tests.conftest import running_server, serve_app
    from tests.fakes import FakeEngine
    from tests.test_api_create import upload_dir

    registry = registry_with(tmp_path / "reg", tiny_models["llama"], {})
    expected = {
        "lora": ("LORA", False),
        "dora": ("LORA", True),
        "ia3": ("IA3", False),
        "ia3_up": ("IA3", False),
        "notask": ("LORA", False),
    }

    def check(name: str, kind: str) -> None:
        record = registry.get(name)
        assert record.is_adapter and record.config.base_model == "tiny:latest", name
        info = record.config.adapter
        assert info is not None and (info.peft_type, info.use_dora) == expected[kind], name

    async with serve_app(registry, FakeEngine()) as served:
        for kind in KINDS:
            adapters = await upload_dir(served.ollama, typed_adapters["llama", kind])
            await served.ollama.create(model=f"api-{kind}", from_="tiny", adapters=adapters)
            check(f"api-{kind}", kind)
    settings = Settings(models=registry.root, adapters=None, import_default=False)
    app = create_app(settings, registry=registry, engine=FakeEngine())
    async with running_server(app, settings) as port:
        monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
        for kind in KINDS:
            work = tmp_path / f"modelfile-{kind}"
            shutil.copytree(typed_adapters["llama", kind], work / "adapter")
            (work / "Modelfile").write_text("FROM tiny\nADAPTER ./adapter\n")
            argv = ["create", f"file-{kind}", "-f", str(work / "Modelfile")]
            assert await asyncio.to_thread(main, argv) == 0, kind
            check(f"file-{kind}", kind)
    folder = tmp_path / "dropin"
    for kind in KINDS:
        shutil.copytree(typed_adapters["llama", kind], folder / f"drop-{kind}")
    result = register_dropins(registry, folder)
    assert sorted(result.registered) == sorted(f"drop-{k}:latest" for k in KINDS)
    for kind in KINDS:
        check(f"drop-{kind}", kind)


def patched(source: Path, target: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the adapter at ``source`` with config keys replaced and ``tensors`` (a
    function of the tensor dict) applied to its weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "adapter_config.json").read_text())
        data.update(config)
        (target / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = target / "adapter_model.safetensors"
        save_file(tensors(load_file(str(weights))), str(weights))
    return target


def drop_magnitude(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k in tensors if k.endswith("q_proj.lora_magnitude_vector"))
    return {k: v for k, v in tensors.items() if k != name}


def short_magnitude(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[:-1] if "magnitude" in k else v for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("kind", "config", "tensors", "message"),
    [
        *(
            ("lora", {"peft_type": t}, None, "the supported types are LoRA")
            for t in ("LOHA", "LOKR", "VERA", "ADALORA", "PROMPT_TUNING", "OFT")
        ),
        ("lora", {"auto_mapping": {"base_model_class": "Evil"}}, None, "custom code"),
        ("lora", {"auto_mapping": "transformers.AutoModel"}, None, "custom code"),
        (
            "notask",
            {"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil.module"}},
            None,
            "outside transformers",
        ),
        (
            "notask",
            {
                "auto_mapping": {
                    "base_model_class": "Model",
                    "parent_library": "transformers_modules.evil.modeling",
                }
            },
            None,
            "outside transformers",
        ),
        ("lora", {"use_dora": True}, None, "lacks its lora_magnitude_vector"),
        ("dora", None, drop_magnitude, "lacks its lora_magnitude_vector"),
        ("dora", None, short_magnitude, "does not fit"),
        ("dora", {"use_dora": False}, None, "does not belong in a LoRA adapter"),
        ("lora", {"peft_type": "IA3"}, None, "does not belong in a IA3 adapter"),
        ("ia3", {"feedforward_modules": []}, None, "does not fit"),
        ("ia3", {"feedforward_modules": "(("}, None, "not a usable pattern"),
        ("lora", {"lora_bias": True}, None, "lora_bias"),
    ],
)
def test_unsupported_or_broken_adapters_are_refused_at_import(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    typed_adapters,
    kind: str,
    config: dict | None,
    tensors,
    message: str,
) -> None:
    from tests.conftest import tree_hash

    registry = registry_with(tmp_path / "reg", tiny_models["llama"], {})
    adapter = patched(typed_adapters["llama", kind], tmp_path / "bad", config, tensors)
    before = tree_hash(registry.root)
    with pytest.raises(InvalidModel, match=message):
        import_adapter_dir(registry, adapter, "bad", "tiny")
    assert tree_hash(registry.root) == before


def test_the_reader_refuses_what_import_would(tmp_path: Path, typed_adapters) -> None:
    """The engine's reader holds the same line (files could change under a digest check
    only by a bug, but a NaN passes the header check and is caught here)."""
    for kind, config, tensors, message in [
        ("lora", {"peft_type": "LOHA"}, None, "supported types"),
        ("dora", None, drop_magnitude, "lacks its lora_magnitude_vector"),
        ("ia3", {"feedforward_modules": []}, None, r"not the \[out, 1\]"),
        (
            "dora",
            None,
            lambda t: {k: v * float("nan") if "magnitude" in k else v for k, v in t.items()},
            "NaN",
        ),
    ]:
        target = tmp_path / f"{kind}-{message[:4]}"
        adapter = patched(typed_adapters["llama", kind], target, config, tensors)
        with pytest.raises(LoraError, match=message):
            read(adapter, "k")


def test_bank_refuses_vectors_that_do_not_fit(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    bank = LoraBank(model, 2, torch.float32, torch.device("cpu"))
    path = "model.layers.0.mlp.down_proj"
    wrong = LoraWeights("k", 0, 0.0, kind="ia3", vectors={path: ("in", torch.ones(64))})
    with pytest.raises(LoraError, match="do not fit"):
        bank.load(0, wrong)
    zero = LoraWeights(
        "k",
        1,
        1.0,
        {path: (torch.zeros(1, 128), torch.zeros(64, 1))},
        kind="dora",
        magnitudes={path: torch.ones(64)},
    )
    model.get_submodule(path).weight.data[3].zero_()  # a zero row: no direction to rescale
    with pytest.raises(LoraError, match="norms are zero"):
        bank.load(0, zero)
    assert not any(bank.vectored) and bank.layers[path].out_at is None


async def test_a_nan_adapter_fails_alone(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters
) -> None:
    """NaN passes the import's header check; the load refuses it with a clear error, and
    requests for the base and other adapters, in the same batch, are unharmed."""
    bad = patched(
        typed_adapters["llama", "ia3"],
        tmp_path / "nan",
        tensors=lambda t: {k: v * float("nan") for k, v in t.items()},
    )
    dirs = {"dora": typed_adapters["llama", "dora"], "bad": bad}
    registry = registry_with(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    try:
        solo = {m: await run(engine, m, PROMPTS[0]) for m in ("tiny", "dora")}
        results = await asyncio.gather(
            run(engine, "dora", PROMPTS[0]),
            run(engine, "bad", PROMPTS[0]),
            run(engine, "tiny", PROMPTS[0]),
            return_exceptions=True,
        )
        assert results[0] == solo["dora"] and results[2] == solo["tiny"]
        assert isinstance(results[1], Exception) and "NaN" in str(results[1])
        assert engine.health()
    finally:
        engine.close()


# ------------------------------------------------------------------------------ merge


async def test_dora_and_ia3_merge_into_models_that_generate_the_same(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters
) -> None:
    from ollama_compact_server.jobs.merge import merge_adapter

    dirs = {kind: typed_adapters["qwen2", kind] for kind in ("dora", "ia3", "notask")}
    registry = registry_with(tmp_path / "reg", tiny_models["qwen2"], dirs)
    for kind in dirs:
        merge_adapter(registry, kind, f"{kind}-merged")
    engine = start(registry)
    try:
        for kind in dirs:
            adapter = await run(engine, kind, PROMPTS[0])
            assert await run(engine, f"{kind}-merged", PROMPTS[0]) == adapter, kind
    finally:
        engine.close()


def test_memory_plan_reserves_room_for_the_vectors(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters
) -> None:
    from ollama_compact_server.engine.provider import RegistrySizing

    registry = registry_with(
        tmp_path / "reg", tiny_models["llama"], {"ia3": typed_adapters["llama", "ia3"]}
    )
    sizing = RegistrySizing(
        registry, dtype=torch.float32, num_parallel=2, context_length=256, max_loras=3
    )
    assert sizing.adapters_of("tiny") == (3, 1)  # IA3 has no rank: its vectors, as rank 1
    import_adapter_dir(registry, typed_adapters["llama", "dora"], "dora", "tiny")
    assert sizing.adapters_of("tiny") == (3, 9)  # rank 8, and DoRA's vectors


def test_forwards_pay_only_for_the_kinds_their_rows_use(
    tiny_models: dict[str, Path], typed_adapters
) -> None:
    """With DoRA and IA3 adapters resident, a forward of LoRA and bare rows gathers no
    vectors, and one of IA3 and bare rows computes no low-rank update; one gather of the
    vector store serves every projection."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    bank = LoraBank(model, 4, torch.float32, torch.device("cpu"))
    for slot, kind in enumerate(["lora", "dora", "ia3"]):
        bank.load(slot, read(typed_adapters["llama", kind], kind))
    bank.select([0, -1, 0])
    assert bank.rows.mask is not None and bank.rows.vectors is None
    bank.select([2, -1])
    assert bank.rows.mask is None and bank.rows.vectors is not None
    assert bank.rows.vectors.shape == (2, bank.vectors.width)
    bank.select([1, 2, -1])
    assert bank.rows.mask is not None and bank.rows.mask.shape[-1] == 2 * bank.rank  # width 2
    bank.select([-1, -1])
    assert not bank.rows.active
    bank.clear(2)
    bank.select([2])
    assert not bank.rows.active


async def test_a_broken_adapter_is_a_400_in_both_dialects(
    tmp_path: Path, tiny_models: dict[str, Path], typed_adapters
) -> None:
    """An adapter whose weights only the load can judge (NaN) answers 400 with the reason,
    before any output, in either dialect (and for embeddings); the base still serves."""
    from tests.conftest import serve_app

    bad = patched(
        typed_adapters["llama", "dora"],
        tmp_path / "nan",
        tensors=lambda t: {k: v * float("nan") if "lora_B" in k else v for k, v in t.items()},
    )
    registry = registry_with(tmp_path / "reg", tiny_models["llama"], {"bad": bad})
    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        body = {"model": "bad", "prompt": "hi", "raw": True, "options": {"num_predict": 3}}
        for stream in (False, True):
            r = await raw.post("/api/generate", json={**body, "stream": stream})
            assert r.status_code == 400 and "NaN" in r.json()["error"], r.text
        r = await raw.post(
            "/v1/chat/completions",
            json={"model": "bad", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400 and "NaN" in r.json()["error"]["message"], r.text
        r = await raw.post("/api/embed", json={"model": "bad", "input": "hi"})
        assert r.status_code == 400, r.text
        r = await raw.post("/api/generate", json={**body, "model": "tiny", "stream": False})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("method", ["dora", "ia3"])
async def test_adapters_trained_here_serve_as_peft_runs_them(
    tmp_path: Path, tiny_models: dict[str, Path], method: str
) -> None:
    """`ollama-compact finetune --method dora / ia3` (jobs.finetune) adds its adapter
    through the same import; it serves, with peft's greedy tokens for the saved files."""
    from ollama_compact_server.jobs.finetune import finetune
    from ollama_compact_server.modeling.loader import model_dir
    from ollama_compact_server.registry.manifest import MT_ADAPTER_FILE
    from tests.test_finetune import chat_lines, spec

    registry = registry_with(tmp_path / "reg", tiny_models["gemma3"], {})
    data = tmp_path / "train.jsonl"
    data.write_text(chat_lines())
    record = finetune(registry, spec(data, name="trained", method=method), lambda line: None)
    info = record.config.adapter
    assert info is not None and (info.peft_type == "IA3") == (method == "ia3")
    assert info.use_dora == (method == "dora")
    engine = start(registry)
    try:
        ours = await run(engine, "trained", PROMPTS[0])
        assert ours != await run(engine, "tiny", PROMPTS[0])
    finally:
        engine.close()
    with model_dir(registry, record, MT_ADAPTER_FILE) as directory:
        assert ours == peft_generate(tiny_models["gemma3"], directory, PROMPTS[0])


def test_a_pathological_feedforward_pattern_is_refused_in_time() -> None:
    """feedforward_modules may be a regular expression; one that backtracks exponentially
    on a module name is stopped by a deadline, not run to the end on the loader thread."""
    import time

    from ollama_compact_server.registry.errors import InvalidModel
    from ollama_compact_server.registry.peft import is_feedforward

    slow = r"(\w|.)*\W\W\W\W\W\W\W\W"
    started = time.monotonic()
    with pytest.raises(InvalidModel, match="too long to match"):
        is_feedforward({"feedforward_modules": slow}, "model.layers.10.mlp.down_proj" * 2)
    assert time.monotonic() - started < 5
    assert is_feedforward({"feedforward_modules": r".*\.mlp\.down_proj"}, "m.mlp.down_proj")

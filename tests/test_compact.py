"""The compact forward of every family it covers equals transformers' own modules over our
slot cache: logits of chunked and batched prefill and of decode steps, greedy tokens, with
sliding windows, partial rotary, fused projections, compressed modules and LoRA slots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.runner import ModelRunner
from ollama_compact_server.modeling.compact import CompactModel, compact_for
from ollama_compact_server.modeling.lora import read_peft_adapter
from tests.factory import make_lora_adapter, make_tiny_model

FAMILIES = ("llama", "qwen2", "gemma3", "qwen3", "mistral", "phi3")
CAPACITY = 128


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact-models")
    return {f: make_tiny_model(root / f, f) for f in FAMILIES}


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def runners(path: Path, slots: int = 4) -> tuple[ModelRunner, ModelRunner]:
    """(ours, transformers'), each on its own copy of the model."""
    ours = ModelRunner(
        load(path), slots=slots, capacity=CAPACITY, dtype=torch.float32, device=torch.device("cpu")
    )
    theirs = ModelRunner(
        load(path),
        slots=slots,
        capacity=CAPACITY,
        dtype=torch.float32,
        device=torch.device("cpu"),
        compact=False,
    )
    assert isinstance(ours.compact, CompactModel) and theirs.compact is None
    return ours, theirs


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


PROMPTS = [list(range(10, 50)), list(range(60, 67)), [7, 8, 9]]  # 40 tokens: past the windows


def run_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill in chunks (one sequence), batched prefill (two), then decode steps for all
    three: every logits tensor along the way."""
    outs = []
    first = PROMPTS[0]
    outs.append(runner.prefill(0, first[:16], 0))
    outs.append(runner.prefill(0, first[16:], 16, all_logits=True))
    outs.append(runner.prefill_batch([1, 2], PROMPTS[1:]))
    tokens = [int(o.argmax(-1)) for o in (outs[1][-1:], outs[2][0:1], outs[2][1:2])]
    lengths = [len(p) for p in PROMPTS]
    for _ in range(6):
        logits = runner.decode([0, 1, 2], tokens, lengths)
        outs.append(logits)
        tokens = logits.argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_forward_equals_transformers(family_dirs: dict[str, Path], family: str) -> None:
    ours, theirs = runners(family_dirs[family])
    for a, b in zip(run_steps(ours), run_steps(theirs)):
        close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_equals_transformers_generate(
    family_dirs: dict[str, Path], family: str
) -> None:
    ours, _ = runners(family_dirs[family], slots=1)
    reference = load(family_dirs[family])
    prompt = list(range(20, 52))
    logits = ours.prefill(0, prompt, 0)
    tokens = [int(logits.argmax(-1))]
    for step in range(11):
        logits = ours.decode([0], [tokens[-1]], [len(prompt) + step])
        tokens.append(int(logits.argmax(-1)))
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert tokens == expected[0, len(prompt) :].tolist()


def test_fused_projections_share_the_original_storage(family_dirs: dict[str, Path]) -> None:
    """q/k/v and gate/up become one matrix each; the original modules hold views of it, so
    nothing is stored twice and their shapes still describe them."""
    model = load(family_dirs["llama"])
    before = sum(p.numel() for p in model.parameters())
    compact = compact_for(model)
    assert compact is not None
    attn = model.model.layers[0].self_attn
    fused = compact.layers[0].qkv
    assert len(fused) == 1 and fused[0].weight is not None
    assert attn.q_proj.weight.data_ptr() == fused[0].weight.data_ptr()
    assert attn.k_proj.weight.shape == (attn.k_proj.out_features, attn.k_proj.in_features)
    assert sum(p.numel() for p in model.parameters()) == before


def test_other_architectures_keep_transformers_modules(family_dirs: dict[str, Path]) -> None:
    model = load(family_dirs["llama"])
    model.config.model_type = "bloom"  # anything not covered
    assert compact_for(model) is None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compressed_modules_run_in_the_compact_forward(
    tmp_path: Path, family_dirs: dict[str, Path], scheme: str
) -> None:
    from ollama_compact_server.jobs.compressing import compress_registry_model
    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.registry.importers import import_hf_dir
    from ollama_compact_server.registry.store import Registry

    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, family_dirs["gemma3"], "tiny")
    options = {"method": "rtn"} if scheme == "int4" else {}
    record = compress_registry_model(registry, "tiny", f"tiny:{scheme}", scheme, options)

    def runner(compact: bool) -> ModelRunner:
        model = load_causal_lm(registry, record, dtype=torch.float32)
        return ModelRunner(
            model,
            slots=4,
            capacity=CAPACITY,
            dtype=torch.float32,
            device=torch.device("cpu"),
            compact=compact,
        )

    ours, theirs = runner(True), runner(False)
    assert ours.compact is not None
    for a, b in zip(run_steps(ours), run_steps(theirs)):
        close_quantized(a, b)


def close_quantized(a: torch.Tensor, b: torch.Tensor) -> None:
    """The int8 and int4 kernels quantize activations to int8 per block of 32, so two
    forwards that differ by float rounding (ours and transformers' norms and attention) may
    round an activation to neighbouring codes: up to a tenth on a logit of a tiny random
    model. Beyond that they agree, and so does the greedy choice wherever it is clear."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max()) + 0.05
    top2 = b.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "up_proj"]])
def test_lora_slots_in_the_compact_forward(
    tmp_path: Path, family_dirs: dict[str, Path], targets: list[str] | None
) -> None:
    """Rows of one batch on two adapters and on the bare base: the same logits as
    transformers' modules wrapped by the same LoRA bank (fused q/k/v and gate/up add each
    part's update; the others are wrapped)."""
    path = family_dirs["qwen2"]
    adapters = [
        read_peft_adapter(
            __import__("json").loads((d / "adapter_config.json").read_text()),
            d / "adapter_model.safetensors",
            d.name,
        )
        for d in (
            make_lora_adapter(path, tmp_path / "a", seed=1, target_modules=targets),
            make_lora_adapter(path, tmp_path / "b", seed=2, r=8, alpha=16),
        )
    ]
    ours, theirs = runners(path)
    for runner in (ours, theirs):
        bank = runner.attach_lora(2)
        for slot, weights in enumerate(adapters):
            bank.load(slot, weights)
    prompts = [list(range(10, 30)), list(range(40, 47)), list(range(60, 75))]
    loras = [0, 1, -1]
    a = ours.prefill_batch([0, 1, 2], prompts, loras)
    b = theirs.prefill_batch([0, 1, 2], prompts, loras)
    close(a, b)
    tokens = a.argmax(-1).tolist()
    lengths = [len(p) for p in prompts]
    for _ in range(4):
        a = ours.decode([0, 1, 2], tokens, lengths, loras)
        b = theirs.decode([0, 1, 2], tokens, lengths, loras)
        close(a, b)
        tokens = a.argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    # the adapters change the output: the bare base's row is not what an adapter's would be
    base_only = ours.prefill_batch([3], [prompts[0]], [-1])
    assert not torch.allclose(base_only[0], ours.prefill_batch([3], [prompts[0]], [0])[0])


@pytest.mark.parametrize("family", ["gemma3", "qwen2", "mistral"])
def test_decode_rows_do_not_depend_on_their_batch(
    family_dirs: dict[str, Path], family: str
) -> None:
    """The decode step's C kernel computes every row on its own: a row's logits are the
    same bits alone and beside others."""
    ours, _ = runners(family_dirs[family])
    assert ours.compact is not None
    for slot, prompt in enumerate(PROMPTS):
        ours.prefill(slot, prompt, 0)
    lengths = [len(p) for p in PROMPTS]
    together = ours.decode([0, 1, 2], [5, 6, 7], lengths)
    assert ours.compact.kernels and next(iter(ours.compact.kernels.values())) is not None
    for row in range(3):
        alone = ours.decode([row], [5 + row], [lengths[row]])
        assert torch.equal(alone[0], together[row])

"""Memory planner: parameter counts of well-known models, KV sizing, and budget splits."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from ollama_compact_server.engine.planner import (
    PlanError,
    adapter_bytes,
    count_parameters,
    default_activation_reserve,
    default_budget,
    format_plan,
    kv_bytes_per_token,
    plan_memory,
    serving_plan,
    weight_bytes,
)
from ollama_compact_server.units import GiB, MiB

LLAMA3_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}
MISTRAL_7B: dict[str, Any] = {
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}
QWEN2_7B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
GEMMA3_270M: dict[str, Any] = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAMA3_8B, 8.03e9),
        (MISTRAL_7B, 7.24e9),
        (QWEN2_7B, 7.62e9),
        (GEMMA3_270M, 268e6),
        (GPT2, 124.4e6),
    ],
    ids=["llama3-8b", "mistral-7b", "qwen2-7b", "gemma3-270m", "gpt2"],
)
def test_parameter_counts_match_published_sizes(config: dict[str, Any], expected: float) -> None:
    assert count_parameters(config) == pytest.approx(expected, rel=0.01)


def test_exact_llama3_count_and_bf16_bytes() -> None:
    # embeddings + lm_head 2*128256*4096, 32 layers of 218,112,000, final norm 4096
    assert count_parameters(LLAMA3_8B) == 8_030_261_248
    assert weight_bytes(LLAMA3_8B, "bfloat16") == 2 * 8_030_261_248
    assert weight_bytes(LLAMA3_8B, "float32") == 4 * 8_030_261_248


def test_multimodal_config_uses_text_config() -> None:
    nested = {
        "model_type": "gemma3",
        "text_config": GEMMA3_270M,
        "vision_config": {"hidden_size": 1152},
    }
    assert count_parameters(nested) == count_parameters(GEMMA3_270M)
    plan = plan_memory(nested, budget=4 * GiB)
    assert any("vision" in note for note in plan.notes)


def test_missing_shape_is_a_typed_error() -> None:
    with pytest.raises(PlanError):
        count_parameters({"model_type": "llama", "hidden_size": 4096})
    with pytest.raises(PlanError):
        weight_bytes(LLAMA3_8B, "int3")
    with pytest.raises(PlanError):
        kv_bytes_per_token(LLAMA3_8B, "float64")


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token(LLAMA3_8B, "bfloat16") == 32 * 8 * 128 * 2 * 2 == 131072
    assert kv_bytes_per_token(LLAMA3_8B, "float32") == 262144
    assert kv_bytes_per_token(GEMMA3_270M, "bfloat16") == 2 * 18 * 1 * 256 * 2


def test_quantized_formats_shrink_weights_in_order() -> None:
    sizes = [weight_bytes(LLAMA3_8B, f) for f in ("bfloat16", "int8", "int4", "nf4", "int2")]
    assert sizes == sorted(sizes, reverse=True)
    # int4: projections and lm_head at 0.625 B/weight (group 32, bf16 scale + zero),
    # the 16-bit embedding 2*128256*4096 and norms 2*(32*8192 + 4096)
    assert sizes[2] == 4_362_076_160 + 328_335_360 + 1_050_673_152 + 532_480


def test_llama3_8b_bf16_does_not_fit_16gib() -> None:
    plan = plan_memory(LLAMA3_8B, budget=16 * GiB)
    assert plan.weight_bytes == 16_060_522_496  # 14.96 GiB
    assert plan.activation_reserve == 16 * GiB // 10
    assert plan.kv_budget == 0
    assert not plan.fits
    assert plan.sequences == 0 and plan.kv_bytes == 0
    assert plan.context == 512
    assert any("not one sequence" in note for note in plan.notes)


def test_llama3_8b_int4_fits_16gib_with_nine_full_contexts() -> None:
    plan = plan_memory(LLAMA3_8B, budget=16 * GiB, weight_format="int4")
    assert plan.weight_bytes == 5_741_617_152  # 5.35 GiB
    assert plan.kv_budget == 16 * GiB - 5_741_617_152 - 16 * GiB // 10  # 9.05 GiB
    assert plan.fits
    assert plan.context == 8192
    assert plan.sequences == 9
    assert plan.kv_bytes == 9 * 8192 * 131072 == 9 * GiB
    assert plan.weight_bytes + plan.kv_bytes + plan.activation_reserve <= plan.budget


def test_serving_plan_takes_no_activation_reserve_from_the_budget() -> None:
    """What the engine allocates and `plan` prints: OCS_MEMORY_BUDGET counts weights and KV
    only, KV in the serving dtype. Llama-3-8B in int4 on 14 GiB holds eight 8k sequences
    (the CLI used to take a 1.4 GiB reserve and print seven)."""
    plan = serving_plan(
        LLAMA3_8B,
        budget=14 * GiB,
        dtype="bfloat16",
        weight_format="int4",
        num_parallel=16,
        context_length=8192,
    )
    assert plan.activation_reserve == 0 and plan.kv_dtype == "bfloat16"
    assert (plan.sequences, plan.context) == (8, 8192)
    assert plan.weight_bytes + plan.kv_bytes <= 14 * GiB
    small = serving_plan(
        LLAMA3_8B,
        budget=6 * GiB,
        dtype="bfloat16",
        weight_format="int4",
        num_parallel=16,
        context_length=8192,
    )
    assert small.fits and small.context < 8192  # shrunk to fit, not below 512


def test_adapters_reduce_sequences() -> None:
    one = adapter_bytes(LLAMA3_8B, count=1, rank=16)
    # rank 16 on q,k,v,o,gate,up,down: 1,310,720 weights a layer, 32 layers, 2 bytes
    assert one == 83_886_080
    plan = plan_memory(LLAMA3_8B, budget=16 * GiB, weight_format="int4", adapters=8)
    assert plan.adapter_bytes == 8 * one
    assert plan.sequences == 8


def test_context_shrinks_before_giving_up() -> None:
    weights = weight_bytes(LLAMA3_8B, "int4")
    plan = plan_memory(
        LLAMA3_8B, budget=weights + 300 * MiB, weight_format="int4", activation_reserve=0
    )
    # 8192 tokens need 1 GiB, 4096 need 512 MiB, 2048 need 256 MiB
    assert plan.fits and plan.context == 2048 and plan.sequences == 1
    assert any("shrunk" in note for note in plan.notes)


def test_tiny_budget_does_not_fit() -> None:
    plan = plan_memory(GEMMA3_270M, budget=256 * MiB)
    assert not plan.fits
    assert plan.sequences == 0
    assert plan.notes
    assert "NO" in format_plan(plan)


def test_num_parallel_caps_sequences() -> None:
    plan = plan_memory(GEMMA3_270M, budget=14 * GiB, num_parallel=4)
    assert plan.sequences == 4 and plan.context == 8192
    assert plan.kv_bytes == 4 * 8192 * 18432
    assert any("num_parallel" in note for note in plan.notes)


def test_explicit_context_is_capped_by_model() -> None:
    plan = plan_memory(LLAMA3_8B, budget=16 * GiB, weight_format="int4", context=32768)
    assert plan.context == 8192


def test_default_activation_reserve() -> None:
    assert default_activation_reserve(16 * GiB) == 16 * GiB // 10
    assert default_activation_reserve(4 * GiB) == GiB
    assert default_activation_reserve(2 * GiB) == 512 * MiB


def test_default_budget() -> None:
    for card in (16 * GiB, 16 * 10**9, 15_835_660_288):  # 16 GiB, 16 GB, a T4's report
        budget = default_budget("cuda", total_device_memory=card)
        assert 12 * GiB <= budget <= 14.4 * GiB
    assert default_budget("cuda:0", total_device_memory=80 * GiB) == 14 * GiB
    assert default_budget("cpu", total_ram=32 * GiB) == 16 * GiB
    assert default_budget("cpu") > 0
    with pytest.raises(PlanError):
        default_budget("tpu")


def test_format_plan_mentions_the_numbers() -> None:
    plan = plan_memory(LLAMA3_8B, budget=16 * GiB, weight_format="int4", adapters=2)
    text = format_plan(plan, "llama3:8b")
    assert "llama3:8b" in text
    assert "8 sequences × 8192 tokens" in text  # 2 adapters take 160 MiB of the 9.05 GiB
    assert "5.35 GiB" in text and "128.00 KiB" in text and "16.00 GiB" in text
    assert "2 × rank 16" in text


def test_planner_does_not_import_torch() -> None:
    code = (
        "import sys, ollama_compact_server.engine.planner as p; "
        "p.plan_memory({'model_type': 'llama', 'vocab_size': 10, 'hidden_size': 8, "
        "'num_hidden_layers': 1, 'num_attention_heads': 2}, budget=1 << 30); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""CUDA kernels of the compressed modules: the repacking for CUDA's int4 tinygemm kernel, the
load-time probe that admits a kernel only if it matches the stored weights, and the fallback
to per-call dequantization otherwise.

Without a GPU, the CUDA ops are replaced by CPU emulations of their documented contract
(``_convert_weight_to_int4pack`` takes [N, K/2] bytes with the even column in the high
nibble; ``_weight_int4pack_mm`` computes x @ ((code - 8) * scale + zero).T). That checks our
side of the contract, the plumbing and the fallback; the real kernels run in
``test_real_cuda_kernels``, which needs a CUDA device."""

from __future__ import annotations

import logging

import pytest
import torch

from ollama_compact_server.compress import quant
from ollama_compact_server.compress.format import ModuleSpec
from ollama_compact_server.modeling import quantized
from ollama_compact_server.modeling.quantized import Int4Linear, Int8Linear

N, K, G = 96, 256, 32


def int4_module(serves_rows: bool = False) -> tuple[Int4Linear, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(N, K)
    module = Int4Linear(quant.quantize_int4(weight, G), ModuleSpec("int4", K, N, G), None)
    module.serves_rows = serves_rows
    dense = module.rows(torch.arange(N), torch.float32)
    return module, dense


def emulated_pack(nibbles: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Stands in for the CUDA packing: keeps the codes (unpacked) for emulated_mm."""
    assert nibbles.dtype == torch.uint8 and inner_k_tiles in (2, 4, 8)
    assert (nibbles.shape[1] * 2) % (inner_k_tiles * 16) == 0
    high, low = (nibbles >> 4).to(torch.int32), (nibbles & 0xF).to(torch.int32)
    return torch.stack([high, low], dim=-1).reshape(nibbles.shape[0], -1)  # [N, K]


def emulated_mm(
    x: torch.Tensor, codes: torch.Tensor, group: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    assert x.dtype == torch.bfloat16 and scales_zeros.dtype == torch.bfloat16
    n, k = codes.shape
    scale = scales_zeros[..., 0].t().float()[..., None]  # [N, K/G, 1]
    zero = scales_zeros[..., 1].t().float()[..., None]
    weight = ((codes.view(n, k // group, group).float() - 8) * scale + zero).view(n, k)
    return (x.float() @ weight.t()).to(x.dtype)


@pytest.fixture
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", emulated_pack)
    monkeypatch.setattr(torch, "_weight_int4pack_mm", emulated_mm)


def test_int4_repacks_for_the_cuda_kernel_and_drops_the_stored_layout(emulated_cuda: None) -> None:
    module, dense = int4_module()
    module.prepare_cuda()
    assert module.cuda_weight is not None
    assert module.qweight is None  # not an embedding table: one copy of the weights
    x = torch.randn(5, K)
    # matmul takes the CUDA path for a non-CPU input; call the kernel path directly here
    got = module._cuda_kernel(x, module.cuda_weight)[:, :N].float()
    expected = x.to(torch.bfloat16).float() @ dense.t()
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2)


def test_an_embedding_table_keeps_its_rows(emulated_cuda: None) -> None:
    module, dense = int4_module(serves_rows=True)
    module.prepare_cuda()
    assert module.cuda_weight is not None
    assert torch.equal(module.rows(torch.tensor([3, 7]), torch.float32), dense[[3, 7]])


def test_a_kernel_that_disagrees_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", emulated_pack)

    def swapped_nibbles(x: torch.Tensor, codes: torch.Tensor, group: int, sz: torch.Tensor):
        swapped = codes.view(codes.shape[0], -1, 2).flip(-1).reshape(codes.shape)
        return emulated_mm(x, swapped, group, sz)

    monkeypatch.setattr(torch, "_weight_int4pack_mm", swapped_nibbles)
    module, _ = int4_module()
    with caplog.at_level(logging.WARNING, logger=quantized.__name__):
        module.prepare_cuda()
    assert module.cuda_weight is None and module.qweight is not None
    assert "disagrees" in caplog.text


def test_a_missing_kernel_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(*args: object) -> torch.Tensor:
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", unavailable)
    module, _ = int4_module()
    with caplog.at_level(logging.WARNING, logger=quantized.__name__):
        module.prepare_cuda()
    assert module.cuda_weight is None and module.qweight is not None
    assert "unavailable" in caplog.text

    torch.manual_seed(1)
    int8 = Int8Linear(quant.quantize_int8(torch.randn(N, K)), ModuleSpec("int8", K, N), None)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", unavailable)
    int8.prepare_cuda()
    assert not int8.cuda_kernel


def test_unsupported_group_sizes_keep_dequantizing(emulated_cuda: None) -> None:
    torch.manual_seed(0)
    spec = ModuleSpec("int4", K, N, 16)
    module = Int4Linear(quant.quantize_int4(torch.randn(N, K), 16), spec, None)
    module.prepare_cuda()
    assert module.cuda_weight is None and module.qweight is not None


def test_int8_probe_admits_the_real_kernel_on_cpu() -> None:
    """The probe passes for a correct kernel: torch's int8 kernel on CPU is the same op
    that serves CUDA."""
    torch.manual_seed(1)
    int8 = Int8Linear(quant.quantize_int8(torch.randn(N, K)), ModuleSpec("int8", K, N), None)
    int8.prepare_cuda()
    assert int8.cuda_kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_kernels() -> None:
    """On a GPU: the int8 and int4 modules take their kernels after the move, and their
    outputs match the CPU kernels'."""
    torch.manual_seed(0)
    x = torch.randn(6, K, dtype=torch.bfloat16)
    int8 = Int8Linear(quant.quantize_int8(torch.randn(N, K)), ModuleSpec("int8", K, N), None)
    int4, _ = int4_module()
    for module in (int8, int4):
        expected = module(x).float()
        module.to("cuda")
        got = module(x.cuda()).float().cpu()
        assert torch.allclose(got, expected, rtol=3e-2, atol=3e-2), module.kind
    assert int8.cuda_kernel
    capability = torch.cuda.get_device_capability()
    if capability >= (8, 0):
        assert int4.cuda_weight is not None


def test_an_untied_embedding_table_is_not_repacked(emulated_cuda: None) -> None:
    module, _ = int4_module(serves_rows=True)
    module.serves_matmul = False  # an embedding that no head shares: lookups only
    module.prepare_cuda()
    assert module.cuda_weight is None and module.qweight is not None


def test_repacking_in_blocks_matches_one_block(
    emulated_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, _ = int4_module()
    whole.prepare_cuda()
    monkeypatch.setattr(quantized, "REPACK_ROWS", 16)
    blocks, _ = int4_module()
    blocks.prepare_cuda()
    assert whole.cuda_weight is not None and blocks.cuda_weight is not None
    assert torch.equal(whole.cuda_weight, blocks.cuda_weight)


def test_leaving_the_gpu(emulated_cuda: None) -> None:
    dropped, _ = int4_module()
    dropped.prepare_cuda()
    with pytest.raises(RuntimeError, match="cannot leave the GPU"):
        dropped.leave_cuda()
    kept, dense = int4_module(serves_rows=True)
    kept.prepare_cuda()
    kept.leave_cuda()
    assert kept.cuda_weight is None
    x = torch.randn(3, K)
    # back on the CPU: our kernel (int8 activations) or torch's (bf16 activations), both
    # within a percent or two of the largest output
    expected = x @ dense.t()
    error = (kept(x).float() - expected).abs().max() / expected.abs().max()
    assert float(error) < 2e-2


def test_a_model_wide_dtype_change_keeps_the_kernel_dtypes() -> None:
    module, _ = int4_module()
    torch.manual_seed(1)
    int8 = Int8Linear(quant.quantize_int8(torch.randn(N, K)), ModuleSpec("int8", K, N), None)
    module.to(torch.float16)
    int8.to(torch.float32)
    assert module.scales_zeros.dtype == torch.bfloat16
    assert int8.scales.dtype == torch.bfloat16
    x = torch.randn(2, K)
    assert module(x).shape == (2, N) and int8(x).shape == (2, N)

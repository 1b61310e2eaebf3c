"""Our int8 / int4 CPU kernels: built with the system compiler, equal to float references,
the same result for a row whatever the batch around it, and the fallbacks to torch's
kernels (turned off, or a CPU whose torch packs int4 differently) still correct."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from ollama_compact_server.compress import quant
from ollama_compact_server.compress.format import ModuleSpec
from ollama_compact_server.modeling import cpu_kernels
from ollama_compact_server.modeling.quantized import Int4Linear, Int8Linear

X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_KERNELS = X86 and shutil.which("cc") is not None and cpu_kernels.cpu_supported()[0]


@pytest.fixture
def lib():
    cpu_kernels.reset()
    found = cpu_kernels.get()
    if not HAS_KERNELS:
        pytest.skip(f"no kernels on this machine: {cpu_kernels.reason()}")
    assert found is not None, cpu_kernels.reason()
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


SHAPES = [(130, 96), (64, 640), (1000, 72), (7, 32)]


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_kernel_equals_the_float_reference_and_is_batch_invariant(lib, n, k) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    t = quant.quantize_int8(w)
    scales = t["scales"].float()
    reference = quant.dequantize_int8(t)
    x = torch.randn(17, k, generator=g)
    full = cpu_kernels.int8_mm(lib, x, t["qweight"], scales)
    assert rel(full, x @ reference.t()) < 1e-5
    for m in (1, 2, 3, 4, 5, 16):  # every tiling gives each row the same bits
        part = cpu_kernels.int8_mm(lib, x[:m].contiguous(), t["qweight"], scales)
        assert torch.equal(part, full[:m])
    for row in (0, 7, 16):
        alone = cpu_kernels.int8_mm(lib, x[row : row + 1].contiguous(), t["qweight"], scales)
        assert torch.equal(alone[0], full[row])


@pytest.mark.parametrize(("n", "k", "group"), [(130, 96, 32), (64, 640, 64), (200, 256, 128)])
def test_int4_kernel_equals_the_float_reference_and_is_batch_invariant(lib, n, k, group) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    t = quant.quantize_int4(w, group)
    reference = quant.dequantize_int4(t, n)
    x = torch.randn(19, k, generator=g)
    full = cpu_kernels.int4_mm(lib, x, t["qweight"], t["scales_zeros"], group, n)
    assert full.shape == (19, n)
    assert rel(full, x @ reference.t()) < 1e-5
    for m in (1, 2, 5, 16, 17):
        part = cpu_kernels.int4_mm(
            lib, x[:m].contiguous(), t["qweight"], t["scales_zeros"], group, n
        )
        assert torch.equal(part, full[:m])


def test_int4_kernel_refuses_group_sizes_it_cannot_hold(lib) -> None:
    t = quant.quantize_int4(torch.randn(64, 512), 32)
    with pytest.raises(ValueError, match="group size"):
        cpu_kernels.int4_mm(lib, torch.randn(1, 512), t["qweight"], t["scales_zeros"], 512, 64)


def modules(w: torch.Tensor) -> tuple[Int8Linear, Int4Linear]:
    n, k = w.shape
    int8 = Int8Linear(quant.quantize_int8(w), ModuleSpec("int8", k, n), None)
    int4 = Int4Linear(quant.quantize_int4(w, 32), ModuleSpec("int4", k, n, 32), None)
    return int8, int4


@pytest.mark.parametrize("setting", ["true", "false"])
def test_modules_compute_the_same_with_or_without_our_kernels(monkeypatch, setting) -> None:
    """OCS_CPU_KERNELS=false falls back to torch's kernels (bf16 activations); on a CPU where
    torch packs int4 in 32-row blocks the module repacks for it instead of reading garbage."""
    monkeypatch.setenv("OCS_CPU_KERNELS", setting)
    cpu_kernels.reset()
    try:
        w = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)) * 0.05
        int8, int4 = modules(w)
        x = torch.randn(3, 128)
        assert rel(int8(x), F.linear(x, quant.dequantize_int8(quant.quantize_int8(w)))) < 0.02
        deq4 = quant.dequantize_int4(quant.quantize_int4(w, 32), 96)
        assert rel(int4(x), F.linear(x, deq4)) < 0.02
        assert (cpu_kernels.get() is None) == (setting == "false" or not HAS_KERNELS)
    finally:
        cpu_kernels.reset()


def test_a_library_that_disagrees_is_refused(monkeypatch, lib) -> None:
    def broken(lib, x, q, s):
        return torch.zeros(x.shape[0], q.shape[0])

    monkeypatch.setattr(cpu_kernels, "int8_mm", broken)
    cpu_kernels.reset()
    try:
        assert cpu_kernels.get() is None
        assert "disagrees" in cpu_kernels.reason()
    finally:
        monkeypatch.undo()
        cpu_kernels.reset()


def test_a_library_built_ahead_needs_no_compiler(monkeypatch, lib) -> None:
    """The Docker image compiles the kernels in its build stage: the runtime, without a
    compiler, finds them by the sources' digest."""
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels.reset()
    try:
        assert cpu_kernels.get() is not None, cpu_kernels.reason()
    finally:
        cpu_kernels.reset()


@pytest.mark.parametrize(("n", "k"), [(130, 96), (64, 640), (1000, 72), (70, 5)])
def test_blocked_int8_equals_the_reference_and_is_batch_invariant(lib, n, k) -> None:
    """The runtime layout of int8 on CPU: blocks of 64 rows, groups of 4 columns side by
    side, columns padded to 32; x quantized per row in blocks of 32 and multiplied in
    integers, each output summed over the blocks in order, whatever the batch."""
    g = torch.Generator().manual_seed(n + 7 * k)
    t = quant.quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    blocked = quant.block_int8(t["qweight"])
    assert blocked.shape == (-(-n // 64), -(-k // 32) * 8, 64, 4)
    assert torch.equal(quant.unblock_int8(blocked, n, k), t["qweight"])
    ids = torch.tensor([[0, n - 1], [n // 2, 1]])
    assert torch.equal(quant.blocked_int8_rows(blocked, ids, k), t["qweight"][ids])
    scales = torch.zeros(blocked.shape[0] * 64)
    scales[:n] = t["scales"].float()
    x = torch.randn(50, k, generator=g)  # more rows than one tile of running sums holds
    x[3] = 0.0  # a row of zeros quantizes to zeros
    full = cpu_kernels.int8_blocked_mm(lib, x, blocked, scales, n)
    expected = cpu_kernels.blocked_int8_reference(x, t["qweight"], scales[:n])
    assert rel(full, expected.float()) < 1e-5
    assert torch.equal(full[3], torch.zeros(n))
    # int8 activations cost about a percent against the float product
    assert rel(full, x @ quant.dequantize_int8(t).t()) < 0.03
    for m in (1, 2, 3, 4, 5, 17, 33, 49):
        part = cpu_kernels.int8_blocked_mm(lib, x[:m].contiguous(), blocked, scales, n)
        assert torch.equal(part, full[:m])


def test_activation_quantization_matches_the_kernel_on_ties_and_extremes(lib) -> None:
    """Halfway codes round to even, the block's largest magnitude maps to +-127, and a
    weight of ones reads each block's code sum back out."""
    x = torch.zeros(2, 64)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 0.5, 1.5  # codes 127, 0 (tie to even), 2
    x[1, 32], x[1, 33] = -3.0, 1.0  # second block: codes -127, 42 (42.33)
    codes, d = cpu_kernels.quantize_activations(x)
    assert codes[0, :3].tolist() == [127.0, 0.0, 2.0]
    assert codes[1, 32:34].tolist() == [-127.0, 42.0] and d[1, 0] == 0
    ones = torch.ones(64, 64, dtype=torch.int8)
    scales = torch.ones(64)
    got = cpu_kernels.int8_blocked_mm(lib, x, quant.block_int8(ones), scales, 64)
    assert torch.allclose(got, cpu_kernels.blocked_int8_reference(x, ones, scales).float())


@pytest.mark.parametrize(("n", "k", "g"), [(130, 96, 32), (64, 640, 32), (100, 256, 128)])
def test_blocked_int4_equals_the_reference_and_is_batch_invariant(lib, n, k, g) -> None:
    """int4 codes multiplied as integers with the quantized x, group by group, the
    same bits for a row whatever the rows beside it."""
    gen = torch.Generator().manual_seed(n + k + g)
    t = quant.quantize_int4(torch.randn(n, k, generator=gen) * 0.05, g)
    blocked = quant.block_int4(t["qweight"])
    assert blocked.shape == (-(-n // 64), k // 8, 64, 4)
    assert torch.equal(quant.unblock_int4(blocked), t["qweight"])
    x = torch.randn(37, k, generator=gen)
    full = cpu_kernels.int4_blocked_mm(lib, x, blocked, t["scales_zeros"], g, n)
    codes = quant.unpack_int4_rows(t["qweight"], torch.arange(n))
    sz = t["scales_zeros"].float()[:, :n]  # [K/G, N, 2]
    expected = cpu_kernels.blocked_int4_reference(x, codes, sz[..., 0].t(), sz[..., 1].t())
    assert rel(full, expected.float()) < 1e-5
    assert rel(full, x @ quant.dequantize_int4(t, n).t()) < 0.03
    for m in (1, 2, 3, 5, 32, 33):
        part = cpu_kernels.int4_blocked_mm(
            lib, x[:m].contiguous(), blocked, t["scales_zeros"], g, n
        )
        assert torch.equal(part, full[:m])


@pytest.mark.parametrize(
    ("n", "k", "g"), [(130, 96, 32), (64, 640, 32), (200, 256, 128), (7, 64, 64)]
)
def test_vnni_kernels_give_the_avx2_kernels_bits(lib, n, k, g) -> None:
    """On a CPU with AVX512-VNNI the blocked products run ocs_vnni.c; every output must be
    bit for bit what the AVX2 kernels give (the same integer block sums, the same float
    steps), at every batch size, so neither the CPU nor the batch changes a result."""
    if lib.ocs_set_isa(1) != 1:
        pytest.skip("the CPU lacks AVX512-VNNI")
    gen = torch.Generator().manual_seed(n * k + g)
    w = torch.randn(n, k, generator=gen) * 0.05
    t8, t4 = quant.quantize_int8(w), quant.quantize_int4(w, g)
    t8["qweight"][0, :4] = torch.tensor([127, -127, 127, -127], dtype=torch.int8)  # extremes
    b8, b4 = quant.block_int8(t8["qweight"]), quant.block_int4(t4["qweight"])
    scales = torch.zeros(b8.shape[0] * 64)
    scales[:n] = t8["scales"].float()
    x = torch.randn(70, k, generator=gen)
    x[5] = 0.0
    x[6, : min(k, 32)] = -1.0  # every code -127: the correction term at its largest
    try:
        for m in (1, 2, 3, 4, 5, 6, 7, 31, 64, 70):
            rows = x[:m].contiguous()
            got = []
            for level in (1, 0):
                assert lib.ocs_set_isa(level) == level
                got.append(
                    (
                        cpu_kernels.int8_blocked_mm(lib, rows, b8, scales, n),
                        cpu_kernels.int4_blocked_mm(lib, rows, b4, t4["scales_zeros"], g, n),
                    )
                )
            assert torch.equal(got[0][0], got[1][0]), f"int8, {m} rows"
            assert torch.equal(got[0][1], got[1][1]), f"int4, {m} rows"
    finally:
        lib.ocs_set_isa(1)


def test_an_int4_module_moves_to_the_blocked_layout_and_back() -> None:
    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(6)) * 0.05
    _, module = modules(w)
    stored = module.qweight.clone()
    expected = module.rows(torch.arange(100), torch.float32)
    module.to_blocked()
    assert module.blocked is not None and module.qweight is None  # one copy in memory
    assert torch.equal(module.rows(torch.arange(100), torch.float32), expected)
    assert torch.equal(module.qweight, stored)  # rebuilt for the lookup


def test_an_int8_module_moves_to_the_blocked_layout_and_back() -> None:
    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(5)) * 0.05
    module, _ = modules(w)
    ids = torch.tensor([0, 63, 64, 99])
    expected = module.rows(ids, torch.float32)
    module.to_blocked()
    assert module.blocked and module.qweight.shape == (2, 16, 64, 4)
    assert torch.equal(module.rows(ids, torch.float32), expected)  # embedding lookups
    module.to_rows()  # what the CUDA and torch kernels read
    assert not module.blocked and module.qweight.shape == (100, 64)
    assert torch.equal(module.rows(ids, torch.float32), expected)

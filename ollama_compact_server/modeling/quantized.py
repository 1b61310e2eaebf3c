"""Runtime modules for compressed weights (weight-free stand-ins for nn.Linear / nn.Embedding
that keep module names and in/out features) and the loader that builds a compressed model.

Kernels (see docs/PERFORMANCE.md), all with bf16 activations: int8 runs
``torch._weight_int8pack_mm`` (CPU and CUDA); int4 / int2 run ``_weight_int4pack_mm_for_cpu``
on CPU and the CUDA tinygemm kernel ``_weight_int4pack_mm`` on CUDA (repacked from the stored
CPU layout when the module moves to the GPU); nf4 runs bitsandbytes on CUDA. A CUDA kernel is
used only after a probe at load has matched it against the dequantized weights (it needs
compute capability 8.0 for int4, and group sizes 32-256); otherwise, and for nf4 on CPU, the
module dequantizes on every call and logs why. Low-rank runs two dense matmuls; pruned
weights are dense.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import quant
from ..compress.format import FORMAT_KEY, FORMAT_VERSION, MODULES_KEY, ModuleSpec, specs_from
from . import cpu_kernels

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the packed kernels are fast with bf16 activations only
# torch's CUDA int8 weight-only kernel computes each output with a plain reduction and reads
# the weight once per input row: a win for decode of a few rows (a quarter of bf16's bytes
# per row), not for batches. Not measured here (no GPU); the bound follows the byte count.
INT8_CUDA_MAX_ROWS = 4
KERNEL_TOLERANCE = 0.03  # relative error of a kernel probe (bf16 rounding is about 0.4%)
INT4_CUDA_GROUPS = (32, 64, 128, 256)  # group sizes the CUDA tinygemm kernel supports
REPACK_ROWS = 8192  # rows unpacked at a time when repacking int4 for CUDA


class _Dequantized(torch.autograd.Function):
    """``x @ W.T`` for a frozen compressed ``W`` with a gradient for ``x`` (QLoRA: training
    an adapter on a compressed base). The forward is the module's own kernel (what serving
    computes); the backward dequantizes the weight for the call and drops it: memory stays
    that of the compressed model."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: CompressedLinear) -> torch.Tensor:
        ctx.module = module
        return module.matmul(x).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.module.dense(grad.dtype, grad.device), None


class CompressedLinear(nn.Module):
    """Common surface of the runtime linears: ``in_features``, ``out_features``, ``bias``."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.on_cuda = False
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.requires_grad and torch.is_grad_enabled():  # an adapter trains on this base
            y = _Dequantized.apply(x.reshape(-1, shape[-1]), self)
        else:
            y = self.matmul(x.reshape(-1, shape[-1])).to(x.dtype)  # y: [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``ids`` of the weight (an embedding lookup): [*ids.shape, K]."""
        raise NotImplementedError

    def dense(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole weight dequantized [N, K] (what the module computes with)."""
        ids = torch.arange(self.out_features, device=self.device or device)
        return self.rows(ids, dtype).to(device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)
        self.keep_kernel_dtypes()  # a model-wide .to(float16) must not reach the kernels
        device = self.device
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and not self.on_cuda:
            self.prepare_cuda()  # once per arrival on the GPU (a tied table comes twice)
        elif not on_cuda and self.on_cuda:
            self.leave_cuda()
        self.on_cuda = on_cuda
        return result

    def keep_kernel_dtypes(self) -> None:
        """Casts the kernels' scale tensors back to the dtype the kernels take."""

    def leave_cuda(self) -> None:
        """Undoes prepare_cuda after a move off the GPU."""

    @property
    def device(self) -> torch.device | None:
        for tensor in self.buffers():
            return tensor.device
        return None

    def prepare_cuda(self) -> None:
        """Sets up the module's CUDA kernel, if it has one (after a move to the GPU)."""

    def kernel_matches(self, fast: Any, reference_rows: int = 256) -> bool:
        """True if ``fast`` (x [M, K] -> [M, >= N]) agrees with the dequantized weight on a
        random probe (first ``reference_rows`` outputs). A kernel that raises, or a packing
        that disagrees with the stored layout, is caught here instead of serving garbage."""
        device = self.device or torch.device("cpu")
        rows = min(reference_rows, self.out_features)
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(4, self.in_features, generator=generator, device=device, dtype=KERNEL_DTYPE)
        try:
            weight = self.rows(torch.arange(rows, device=device), torch.float32)
            expected = x.float() @ weight.t()
            got = fast(x)[:, :rows].float()
        except Exception as exc:  # a missing or unsupported kernel
            log.warning("%s kernel unavailable (%s); dequantizing per call", self.kind, exc)
            return False
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-6))
        if not error < KERNEL_TOLERANCE:
            log.warning(
                "%s kernel disagrees with the stored weights (relative error %.3g); "
                "dequantizing per call",
                self.kind,
                error,
            )
            return False
        return True


class Int8Linear(CompressedLinear):
    """Symmetric int8 per output channel. On CPU with our kernels the weight moves, on first
    use, into their blocked layout (``blocked``: [Npad / 64, Kp / 4, 64, 4], see
    quant.block_int8);
    elsewhere it stays [N, K] as stored."""

    kind = "int8"
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, t: dict[str, torch.Tensor], spec: ModuleSpec, bias: torch.Tensor | None):
        super().__init__(spec.in_features, spec.out_features, bias)
        self.register_buffer("qweight", t["qweight"])  # [N, K] int8 (or blocked)
        self.register_buffer("scales", t["scales"].to(KERNEL_DTYPE))  # [N]
        self.cuda_kernel = False  # set by prepare_cuda once the probe passed
        self.blocked = False
        self._scales_f32: torch.Tensor | None = None  # [Npad], for our CPU kernel

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        self.to_rows()
        return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), self.qweight, self.scales)

    def to_blocked(self) -> None:
        """Our CPU kernel's layout (once; the [N, K] tensor is released)."""
        if self.blocked:
            return
        self.qweight = quant.block_int8(self.qweight)
        scales = torch.zeros(self.qweight.shape[0] * quant.INT8_BLOCK_N, dtype=torch.float32)
        scales[: self.out_features] = self.scales.float()
        self._scales_f32 = scales
        self.blocked = True

    def to_rows(self) -> None:
        if self.blocked:
            self.qweight = quant.unblock_int8(self.qweight, self.out_features, self.in_features)
            self._scales_f32 = None
            self.blocked = False

    def _cpu(self, x: torch.Tensor) -> torch.Tensor:
        lib = cpu_kernels.get()
        if lib is None:
            return self._kernel(x)
        self.to_blocked()
        scales = self._scales_f32
        if scales is None:
            raise RuntimeError("blocked int8 weight without its scales")
        return cpu_kernels.int8_blocked_mm(
            lib, x.float().contiguous(), self.qweight, scales, self.out_features
        )

    def keep_kernel_dtypes(self) -> None:
        if self.scales.dtype != KERNEL_DTYPE:
            self.scales = self.scales.to(KERNEL_DTYPE)

    def prepare_cuda(self) -> None:
        self.to_rows()
        self.cuda_kernel = self.kernel_matches(self._kernel)

    def leave_cuda(self) -> None:
        self.cuda_kernel = False

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self._cpu(x)
        if self.cuda_kernel and x.shape[0] <= INT8_CUDA_MAX_ROWS:
            return self._kernel(x)
        # more rows than the CUDA kernel is made for (it reads the weight once per row), or
        # it failed its probe: dequantize and let cuBLAS multiply
        self.to_rows()
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)

    def dense(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        codes = self.qweight
        if self.blocked:
            codes = quant.unblock_int8(codes, self.out_features, self.in_features)
        return (codes.to(dtype) * self.scales.to(dtype)[:, None]).to(device)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scales = self.scales[ids].to(dtype)[..., None]
        if self.blocked:
            return quant.blocked_int8_rows(self.qweight, ids, self.in_features).to(dtype) * scales
        return self.qweight[ids].to(dtype) * scales


class Int4Linear(CompressedLinear):
    """Group-wise asymmetric int4 in the CPU kernel's packed layout (int2 is loaded as this)."""

    kind = "int4"
    qweight: torch.Tensor
    scales_zeros: torch.Tensor
    cuda_weight: torch.Tensor | None
    blocked: torch.Tensor | None

    def __init__(self, t: dict[str, torch.Tensor], spec: ModuleSpec, bias: torch.Tensor | None):
        super().__init__(spec.in_features, spec.out_features, bias)
        self.group_size = int(spec.group_size)
        self.register_buffer("qweight", t["qweight"])  # [Npad, K/2] uint8
        self.register_buffer("scales_zeros", t["scales_zeros"].to(KERNEL_DTYPE))  # [K/G, Npad, 2]
        self.register_buffer("cuda_weight", None)  # tinygemm layout, made by prepare_cuda
        # our CPU kernel's layout (see quant.block_int4), made by to_blocked; not stored
        self.register_buffer("blocked", None, persistent=False)
        self.serves_rows = False  # an embedding table: keeps the stored layout for lookups
        self.serves_matmul = True  # False for an embedding table that no head shares
        self._torch_packed: torch.Tensor | None = None  # torch's own CPU layout, if it differs

    def blockable(self) -> bool:
        """Our integer CPU kernel takes groups that are whole blocks of 32 columns."""
        return self.group_size % 32 == 0 and self.in_features % self.group_size == 0

    def to_blocked(self) -> None:
        """Our CPU kernel's layout (once); the stored layout is released unless the module
        also serves embedding lookups."""
        if self.blocked is not None or self.qweight is None or not self.blockable():
            return
        self.blocked = quant.block_int4(self.qweight)
        if not self.serves_rows:
            self.qweight = None  # type: ignore[assignment]

    def stored(self) -> torch.Tensor:
        """The stored layout [Npad, K/2] (rebuilt from the blocked one if it was released)."""
        if self.qweight is None and self.blocked is not None:
            self.qweight = quant.unblock_int4(self.blocked)
        return self.qweight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self._cpu(x)
        if self.cuda_weight is not None:
            return self._cuda_kernel(x, self.cuda_weight)[:, : self.out_features]
        # no CUDA kernel for this module (see prepare_cuda): dequantize per call
        return F.linear(x, self.rows(torch.arange(self.out_features, device=x.device), x.dtype))

    def _cpu(self, x: torch.Tensor) -> torch.Tensor:
        lib = cpu_kernels.get()
        if lib is not None and self.serves_matmul and self.blockable():
            self.to_blocked()
            if self.blocked is None:
                raise RuntimeError("int4 weight without its blocked layout")
            return cpu_kernels.int4_blocked_mm(
                lib,
                x.float().contiguous(),
                self.blocked,
                self.scales_zeros,
                self.group_size,
                self.out_features,
            )
        self.stored()
        if lib is not None and self.group_size <= cpu_kernels.INT4_MAX_GROUP:
            return cpu_kernels.int4_mm(
                lib,
                x.float().contiguous(),
                self.qweight,
                self.scales_zeros,
                self.group_size,
                self.out_features,
            )
        packed = self.qweight
        if not quant.torch_cpu_int4_layout():
            # torch packs 32-row blocks on this CPU: its kernel gets a copy in that layout
            if self._torch_packed is None:
                rows = torch.arange(self.qweight.shape[0])
                codes = quant.unpack_int4_rows(self.qweight, rows).to(torch.int32)
                self._torch_packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            packed = self._torch_packed
        y = torch._weight_int4pack_mm_for_cpu(
            x.to(KERNEL_DTYPE).contiguous(), packed, self.group_size, self.scales_zeros
        )
        return y[:, : self.out_features]

    def _cuda_kernel(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(
            x.to(KERNEL_DTYPE).contiguous(), packed, self.group_size, self.scales_zeros
        )

    def prepare_cuda(self) -> None:
        """Repacks the stored CPU-kernel layout for CUDA's tinygemm kernel: the codes as
        [N, K/2] bytes (even column in the high nibble), then the kernel's own tiling. The
        scales and zeros are already in its [K/G, N, 2] layout with the same dequantization,
        (code - 8) * scale + zero. The stored layout is dropped afterwards unless the module
        also serves embedding lookups."""
        if self.cuda_weight is not None or not self.serves_matmul:
            return
        if self.qweight is None and self.blocked is None:
            return
        self.stored()
        self.blocked = None
        npad, half = self.qweight.shape
        k = half * 2
        if self.group_size not in INT4_CUDA_GROUPS or k % 32 or npad % 8:
            log.warning(
                "int4 group size %d or shape [%d, %d] does not fit the CUDA kernel; "
                "dequantizing per call",
                self.group_size,
                npad,
                k,
            )
            return
        inner = next(tiles for tiles in (8, 4, 2) if k % (tiles * 16) == 0)
        nibbles = torch.empty((npad, half), dtype=torch.uint8, device=self.qweight.device)
        for start in range(0, npad, REPACK_ROWS):  # in blocks: a vocabulary-sized head is big
            rows = torch.arange(start, min(start + REPACK_ROWS, npad), device=nibbles.device)
            codes = quant.unpack_int4_rows(self.qweight, rows)  # uint8 0..15
            nibbles[start : start + len(rows)] = (codes[:, ::2] << 4) | codes[:, 1::2]
        try:
            packed = torch._convert_weight_to_int4pack(nibbles, inner)
        except Exception as exc:
            log.warning("int4 CUDA packing unavailable (%s); dequantizing per call", exc)
            return
        if not self.kernel_matches(lambda x: self._cuda_kernel(x, packed)):
            return
        self.cuda_weight = packed
        if not self.serves_rows:
            self.qweight = None  # type: ignore[assignment]

    def keep_kernel_dtypes(self) -> None:
        if self.scales_zeros.dtype != KERNEL_DTYPE:
            self.scales_zeros = self.scales_zeros.to(KERNEL_DTYPE)

    def leave_cuda(self) -> None:
        if self.cuda_weight is None:
            return
        if self.qweight is None:
            raise RuntimeError(
                "an int4 module repacked for CUDA cannot leave the GPU; load the model again"
            )
        self.cuda_weight = None

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.qweight is None and self.blocked is not None:
            self.stored()
        if self.qweight is None:
            raise RuntimeError("int4 module without its stored layout cannot look up rows")
        flat = ids.reshape(-1)
        codes = quant.unpack_int4_rows(self.qweight, flat).to(dtype)  # [R, K]
        sz = self.scales_zeros[:, flat].to(dtype)  # [K/G, R, 2]
        groups = codes.reshape(flat.shape[0], -1, self.group_size)  # [R, K/G, G]
        scale = sz[..., 0].t()[..., None]
        zero = sz[..., 1].t()[..., None]
        out = (groups - 8) * scale + zero
        return out.reshape(*ids.shape, self.in_features)


class NF4Linear(CompressedLinear):
    """NF4: bitsandbytes' kernel on CUDA; on CPU dequantized per call (no faster path)."""

    kind = "nf4"
    qweight: torch.Tensor
    absmax: torch.Tensor

    def __init__(self, t: dict[str, torch.Tensor], spec: ModuleSpec, bias: torch.Tensor | None):
        super().__init__(spec.in_features, spec.out_features, bias)
        self.group_size = int(spec.group_size)
        self.register_buffer("qweight", t["qweight"])  # [N, K/2] uint8
        self.register_buffer("absmax", t["absmax"].float())  # [N, K/G]
        self.bnb: Any = None

    def prepare_cuda(self) -> None:
        if self.bnb is None:
            try:
                layer = _bnb_linear(self)
            except Exception as exc:  # bitsandbytes without a working CUDA backend
                log.warning("bitsandbytes nf4 unavailable (%s); dequantizing per call", exc)
                return
            if layer is not None and self.kernel_matches(layer):
                self.bnb = layer

    def leave_cuda(self) -> None:
        self.bnb = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.bnb is not None:
            return self.bnb(x)
        return F.linear(x, self.rows(torch.arange(self.out_features, device=x.device), x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        w = quant.dequantize_nf4({"qweight": self.qweight[flat], "absmax": self.absmax[flat]})
        return w.to(dtype).reshape(*ids.shape, self.in_features)


def _bnb_linear(module: NF4Linear) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return None
    weight = quant.dequantize_nf4(
        {"qweight": module.qweight.cpu(), "absmax": module.absmax.cpu()}
    ).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", blocksize=module.group_size
    )
    return layer.to(str(module.qweight.device))


class LowRankLinear(CompressedLinear):
    """W ~ U @ V (SVD): two thin matmuls."""

    kind = "lowrank"

    def __init__(self, t: dict[str, torch.Tensor], spec: ModuleSpec, bias: torch.Tensor | None):
        super().__init__(spec.in_features, spec.out_features, bias)
        self.u = nn.Parameter(t["u"], requires_grad=False)  # [N, r]
        self.v = nn.Parameter(t["v"], requires_grad=False)  # [r, K]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v.to(x.dtype)), self.u.to(x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.u[ids].to(dtype)) @ self.v.to(dtype)


class QuantEmbedding(nn.Module):
    """An embedding lookup over a compressed table; the same table can serve a tied head."""

    def __init__(self, table: CompressedLinear, scale: float, padding_idx: int | None) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings = table.out_features
        self.embedding_dim = table.in_features
        self.padding_idx = padding_idx
        self.scale = scale
        self.dtype = torch.float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(input_ids, self.dtype)  # [B, T, H]
        return rows * self.scale if self.scale != 1.0 else rows


KINDS: dict[str, Any] = {
    "int8": Int8Linear,
    "int4": Int4Linear,
    "nf4": NF4Linear,
    "lowrank": LowRankLinear,
}


def lora_config(directory: Path) -> Any:
    """The adapter's LoraConfig, taught to wrap the compressed linears with peft's LoRA
    Linear (it only calls the base layer's forward, so any of them works)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig.from_pretrained(str(directory))
    config._register_custom_module({cls: LoraLinear for cls in KINDS.values()})
    return config


# ------------------------------------------------------------------------------ building


def runtime_module(
    spec: ModuleSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """The runtime module of one stored module (its own tensors, without the name prefix)."""
    bias = tensors.get("bias")
    bias = bias.to(dtype) if bias is not None else None
    if spec.kind == "dense":
        linear = nn.Linear(
            spec.in_features, spec.out_features, bias=bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(tensors["weight"].to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear
    if spec.kind == "int2":
        return Int4Linear(quant.int2_as_int4(tensors), spec, bias)
    if spec.kind == "lowrank":
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return KINDS[spec.kind](tensors, spec, bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) left on meta: computed by the model's
    own initialiser, as transformers does for missing keys."""
    # each module is initialised by its own model's initialiser (a vision-language model's
    # CLIP tower knows its position ids, the outer model does not)
    owners: dict[int, Any] = {}
    for part in model.modules():
        if callable(getattr(part, "_init_weights", None)):
            owners.update({id(m): part for m in part.modules()})
    for module in model.modules():
        metas = {n: b for n, b in module.named_buffers(recurse=False) if b.is_meta}
        if not metas:
            continue
        for n, b in metas.items():
            module._buffers[n] = torch.empty_like(b, device="cpu")
        owner = owners.get(id(module))
        init = getattr(owner, "_init_weights", None)
        if init is not None:
            # the initialiser also re-draws the module's weights (an embedding with a scale
            # buffer): keep the loaded ones
            kept = {n: p for n, p in module.named_parameters(recurse=False)}
            for n, p in kept.items():  # init writes in place: let it write into scratch
                setattr(module, n, nn.Parameter(torch.empty_like(p), requires_grad=False))
            init(module)
            for n, p in kept.items():
                setattr(module, n, p)


def auto_class(config: Any) -> Any:
    """transformers' auto class for a config: image-text-to-text for a vision model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if getattr(config, "vision_config", None) is not None:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_compressed(directory: Path, dtype: torch.dtype) -> nn.Module:
    """A transformers causal LM built on meta from ``config.json``, its compressed modules
    swapped in and every tensor taken from ``model.safetensors`` as stored."""
    from safetensors import safe_open
    from transformers import AutoConfig

    cpu_kernels.get()  # built (once) here, on the loader thread, not in the first forward
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
            raise ValueError("model.safetensors is not a compressed model of a known version")
        specs = specs_from(json.loads(metadata[MODULES_KEY]))
        tensors = {key: _aligned(handle.get_tensor(key)) for key in handle.keys()}  # noqa: SIM118
    with torch.device("meta"):
        model = auto_class(config).from_config(
            config, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa"
        )
    embed_name = _embedding_name(model)
    built: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        if spec.kind == "tied":
            continue
        own = {
            k[len(name) + 1 :]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")
        }
        module = runtime_module(spec, own, dtype)
        if spec.embedding:
            original = model.get_submodule(name)
            scale = float(getattr(original, "scalar_embed_scale", 1.0))
            if not isinstance(module, CompressedLinear):
                raise ValueError(f"{name}: an embedding cannot be stored as {spec.kind}")
            if isinstance(module, Int4Linear):
                module.serves_rows = True
                module.serves_matmul = False  # until a tied head shares it (below)
            embedding = QuantEmbedding(module, scale, getattr(original, "padding_idx", None))
            embedding.dtype = dtype
            built[name] = module
            _set_module(model, name, embedding)
        else:
            built[name] = module
            _set_module(model, name, module)
    for name, spec in specs.items():
        if spec.kind == "tied":
            shared = built[spec.source or embed_name]
            if isinstance(shared, Int4Linear):
                shared.serves_matmul = True
            _set_module(model, name, shared)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"unexpected tensors in the compressed model: {unexpected[:5]}")
    _materialize_buffers(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"compressed model lacks tensors: {left[:5]}")
    model.eval()
    return model


def load_dequantized(directory: Path, dtype: torch.dtype) -> nn.Module:
    """A compressed model expanded back to a plain transformers model (its float weights
    are exactly what the compressed modules compute with), for workflows that need float
    weights: compressing an imported GGUF model with another scheme, merging an adapter."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
            raise ValueError("model.safetensors is not a compressed model of a known version")
        specs = specs_from(json.loads(metadata[MODULES_KEY]))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.kind == "tied":
            continue
        own = {
            k[len(name) + 1 :]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")
        }
        module = runtime_module(spec, own, torch.float32)
        if isinstance(module, CompressedLinear):
            rows = torch.arange(spec.out_features)
            state[f"{name}.weight"] = module.rows(rows, torch.float32).to(dtype)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to(dtype)
        else:
            state.update({f"{name}.{k}": v.to(dtype) for k, v in module.state_dict().items()})
    state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    with torch.device("meta"):
        model = auto_class(config).from_config(
            config, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa"
        )
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"unexpected tensors in the compressed model: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialize_buffers(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"compressed model lacks tensors: {left[:5]}")
    model.eval()
    return model


def prepare_for_cpu(model: nn.Module) -> None:
    """Moves int8 and int4 weights into our CPU kernels' layouts now (on the loader thread),
    not in a request's first forward; nothing happens without the kernels."""
    if cpu_kernels.get() is None:
        return
    for module in model.modules():
        on_cpu = (
            getattr(module, "qweight", None) is not None and module.qweight.device.type == "cpu"
        )
        serves = getattr(module, "serves_matmul", True)
        if isinstance(module, Int8Linear | Int4Linear) and on_cpu and serves:
            module.to_blocked()


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The packed kernels read with vector loads: a tensor at an odd file offset is copied."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    for name, module in model.named_modules():
        if module is embedding:
            return name
    return "model.embed_tokens"

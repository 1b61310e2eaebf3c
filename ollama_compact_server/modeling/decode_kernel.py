"""The decode step of a compact model in our C library (csrc/ocs_decode.c): one call per
decoder layer for the rows of a decode step, where the torch path makes some sixty small
operations per layer (on gemma3:270m that dispatch cost 15-20 ms a token on a 2-core CPU,
about as much as reading the weights).

Used for float32 activations on CPU when every projection is one the kernels hold (dense
float32, int8, int4) and no row of the step runs an adapter (LoRA, DoRA or IA3: the kernels
read the base weights only); otherwise the compact forward's torch path runs. The layer's
tensors are described once (pointers into the model's own weights and the slot KV cache); a
step passes only the rows' hidden states, slots, positions and rope angles.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
from torch import nn

from ..compress import quant
from . import cpu_kernels
from .quantized import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

_F = ctypes.c_float
_I = ctypes.c_int64
_J = ctypes.c_int32
_P = ctypes.c_void_p


class Weight(ctypes.Structure):
    _fields_ = [
        ("kind", _J),
        ("group", _J),
        ("n", _I),
        ("k", _I),
        ("npad", _I),
        ("w", _P),
        ("s", _P),
        ("bias", _P),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("hidden", _I),
        ("heads", _I),
        ("kv_heads", _I),
        ("head_dim", _I),
        ("rotary", _I),
        ("inter", _I),
        ("eps", _F),
        ("scale", _F),
        ("sandwich", _J),
        ("qk_norm", _J),
        ("act", _J),
        ("window", _J),
        ("n_qkv", _J),
        ("n_gate_up", _J),
        ("in_norm", _P),
        ("q_norm", _P),
        ("k_norm", _P),
        ("post_attn_norm", _P),
        ("pre_ff_norm", _P),
        ("post_ff_norm", _P),
        ("qkv", Weight * 3),
        ("o", Weight),
        ("gate_up", Weight * 2),
        ("down", Weight),
        ("kcache", _P),
        ("vcache", _P),
        ("capacity", _I),
    ]


class Unsupported(Exception):
    """A layer the C decode step cannot run; the torch path serves the model."""


def _f32(t: torch.Tensor, keep: list[torch.Tensor]) -> int:
    """Pointer to a contiguous float32 CPU copy of ``t`` (kept alive in ``keep``)."""
    t = t.detach()
    if t.device.type != "cpu":
        raise Unsupported("not on the CPU")
    t = t.float().contiguous()
    keep.append(t)
    return int(t.data_ptr())


def describe(module: Any, keep: list[torch.Tensor]) -> Weight:
    """The C description of one projection module (or a fused one)."""
    bias = getattr(module, "bias", None)
    bias_ptr = _f32(bias, keep) if bias is not None else 0
    if isinstance(module, nn.Linear):
        weight = module.weight
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            raise Unsupported("a dense weight that is not contiguous float32")
        if weight.device.type != "cpu":
            raise Unsupported("not on the CPU")
        n, k = weight.shape
        return Weight(0, 0, n, k, n, int(weight.data_ptr()), 0, bias_ptr)
    if type(module) is Int8Linear:
        if module.qweight.device.type != "cpu":
            raise Unsupported("int8 weight not on the CPU")
        module.to_blocked()
        q, scales = module.qweight, module._scales_f32
        if scales is None or not (q.is_contiguous() and scales.is_contiguous()):
            raise Unsupported("int8 weight not in the kernel layout")
        keep.append(scales)
        npad = q.shape[0] * quant.INT8_BLOCK_N
        n, k = module.out_features, module.in_features
        return Weight(3, 0, n, k, npad, int(q.data_ptr()), int(scales.data_ptr()), bias_ptr)
    if type(module) is Int4Linear and module.blockable():
        if not module.serves_matmul:
            raise Unsupported("an int4 embedding table")
        module.to_blocked()
        b, sz = module.blocked, module.scales_zeros
        if b is None or not (b.is_contiguous() and sz.is_contiguous()):
            raise Unsupported("int4 weight not in the kernel layout")
        if sz.dtype != torch.bfloat16 or b.device.type != "cpu":
            raise Unsupported("int4 tensors not in the kernel layout")
        npad = b.shape[0] * quant.INT4_BLOCK_N
        n, k, g = module.out_features, module.in_features, module.group_size
        return Weight(4, g, n, k, npad, int(b.data_ptr()), int(sz.data_ptr()), bias_ptr)
    if type(module) is Int4Linear:
        q, sz = module.stored(), module.scales_zeros
        if q is None or module.group_size > cpu_kernels.INT4_MAX_GROUP:
            raise Unsupported("int4 weight without its CPU layout or with a large group")
        if not (q.is_contiguous() and sz.is_contiguous()) or sz.dtype != torch.bfloat16:
            raise Unsupported("int4 tensors not in the kernel layout")
        return Weight(
            2,
            module.group_size,
            module.out_features,
            module.in_features,
            q.shape[0],
            int(q.data_ptr()),
            int(sz.data_ptr()),
            bias_ptr,
        )
    raise Unsupported(f"no C kernel for {type(module).__name__}")


class DecodeKernel:
    """The C decode step for one compact model over one slot KV cache."""

    def __init__(self, compact: Any, cache: Any, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.cache = cache
        self.keep: list[torch.Tensor] = []
        self.layers: list[Layer] = []
        self.rope_types: list[str] = []
        if cache.k[0].dtype != torch.float32:
            raise Unsupported("the KV cache is not float32")
        config = compact.config
        windowed = compact.family in ("mistral", "phi3")
        for layer in compact.layers:
            spec = Layer()
            spec.hidden = int(config.hidden_size)
            spec.heads, spec.kv_heads = compact.heads, compact.kv_heads
            spec.head_dim = compact.head_dim
            spec.inter = int(config.intermediate_size)
            spec.eps = layer.input_norm.eps
            spec.scale = layer.scaling
            spec.sandwich = int(layer.post_attention_norm is not None)
            spec.qk_norm = int(layer.q_norm is not None)
            spec.act = 1 if compact.gelu else 0
            window = getattr(config, "sliding_window", None)
            sliding = layer.layer_type == "sliding_attention" or (windowed and bool(window))
            spec.window = int(window) if sliding and window else 0
            spec.in_norm = _f32(layer.input_norm.gain, self.keep)
            spec.pre_ff_norm = _f32(layer.pre_ff_norm.gain, self.keep)
            if layer.q_norm is not None and layer.k_norm is not None:
                spec.q_norm = _f32(layer.q_norm.gain, self.keep)
                spec.k_norm = _f32(layer.k_norm.gain, self.keep)
            if layer.post_attention_norm is not None and layer.post_ff_norm is not None:
                spec.post_attn_norm = _f32(layer.post_attention_norm.gain, self.keep)
                spec.post_ff_norm = _f32(layer.post_ff_norm.gain, self.keep)
            qkv = [self._projection(p) for p in layer.qkv]
            spec.n_qkv = len(qkv)
            for i, weight in enumerate(qkv):
                spec.qkv[i] = weight
            spec.o = describe(layer.o, self.keep)
            gate_up = [self._projection(p) for p in layer.gate_up]
            spec.n_gate_up = len(gate_up)
            for i, weight in enumerate(gate_up):
                spec.gate_up[i] = weight
            spec.down = describe(layer.down, self.keep)
            spec.kcache = int(cache.k[layer.index].data_ptr())
            spec.vcache = int(cache.v[layer.index].data_ptr())
            spec.capacity = int(cache.capacity)
            self.layers.append(spec)
            self.rope_types.append(layer.layer_type)
        rotary = compact.rotary_dim
        for spec in self.layers:
            spec.rotary = rotary
        self.scratch: dict[tuple[int, int], torch.Tensor] = {}
        # the end of the step: final norm and head, here too (a BLAS head would make a
        # row's logits depend on the batch); None when the head is not one we hold
        self.hidden = int(config.hidden_size)
        self.norm = _f32(compact.final_norm.gain, self.keep)
        self.eps = compact.final_norm.eps
        self.head: Weight | None = None
        if compact.softcap is None:
            head = compact.head
            table = getattr(head, "table", None)  # a tied, compressed embedding table
            try:
                self.head = describe(table if table is not None else head, self.keep)
            except Unsupported:
                self.head = None

    def _projection(self, proj: Any) -> Weight:
        if proj.module is not None:
            return describe(proj.module, self.keep)
        if proj.packed is not None:
            return describe(proj.packed, self.keep)
        fused: Any = nn.Linear(1, 1, bias=proj.bias is not None, device="meta")
        fused.weight = nn.Parameter(proj.weight, requires_grad=False)
        if proj.bias is not None:
            fused.bias = nn.Parameter(proj.bias, requires_grad=False)
        return describe(fused, self.keep)

    def run(self, h: torch.Tensor, positions: torch.Tensor, rope: dict[str, Any]) -> None:
        """h: [B, hidden] float32 contiguous, advanced in place through every layer;
        positions: [B] int64; rope: per layer type, (cos, sin) as [B, rotary]."""
        rows = h.shape[0]
        threads = torch.get_num_threads()
        scratch = self.scratch.get((rows, threads))
        if scratch is None:  # sized for these rows and threads (attention keeps one row each)
            size = self.lib.ocs_decode_scratch(ctypes.byref(self.layers[0]), rows, threads)
            scratch = self.scratch[rows, threads] = torch.empty(size, dtype=torch.float32)
        slots = self.cache.bound_slots
        call = self.lib.ocs_decode_layer
        hp, sp, pp, xp = h.data_ptr(), slots.data_ptr(), positions.data_ptr(), scratch.data_ptr()
        angles = {k: (c.data_ptr(), s.data_ptr()) for k, (c, s) in rope.items()}
        for spec, kind in zip(self.layers, self.rope_types):
            cos, sin = angles[kind] if kind in angles else angles["default"]
            if call(ctypes.byref(spec), hp, rows, sp, pp, cos, sin, xp, threads) != 0:
                raise RuntimeError("out of memory: no room for a kernel's scratch")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, hidden] after the layers (overwritten) -> logits [B, V], or none if the
        head is not held here."""
        head = self.head
        if head is None:
            raise Unsupported("the head runs on torch")
        rows = h.shape[0]
        out = torch.empty((rows, head.n), dtype=torch.float32)
        xsum = torch.empty(rows * (self.hidden // 16 + 1), dtype=torch.float32)
        status = self.lib.ocs_decode_head(
            ctypes.byref(head),
            self.norm,
            self.eps,
            h.data_ptr(),
            rows,
            self.hidden,
            out.data_ptr(),
            xsum.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError("out of memory: no room for a kernel's scratch")
        return out

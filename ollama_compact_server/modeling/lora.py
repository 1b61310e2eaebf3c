"""Batched adapters: projections that apply, for every row of a batch, the adapter that row
asked for (LoRA, rsLoRA, DoRA or IA3), so requests for different adapters share one forward.

Each wrapped projection keeps the adapters of its device slots side by side: ``A`` is
``[slots * rank, in]`` and ``B`` is ``[slots * rank, out]`` (slot ``s`` owns rows
``s * rank .. (s + 1) * rank``; lower ranks are zero-padded). One forward computes
``x @ A.T`` for every resident adapter at once, keeps each row's own adapter's columns
(a mask that also carries alpha / r), and multiplies by ``B``: two GEMMs per projection
whatever the mix of adapters (the gather-free form of S-LoRA / Punica's segment GEMM).
Rows without an adapter get exact zeros; a batch without any adapter skips the work.

DoRA and IA3 add per-row vectors, gathered by each row's slot index from stores of
``slots + 1`` rows (the last, like every slot without such an adapter, the identity):
``y = out_scale * (base(in_scale * x) + lora) + out_shift``. DoRA's LoRA update goes through
the A / B stores and its out_scale is magnitude / ||W + s B A||_row (computed once, when the
adapter is placed, from the weight the base computes with), with out_shift (1 - out_scale)
* bias keeping the bias unscaled; IA3 scales the output of its other targets (bias
included) and the input of its feedforward ones. A forward whose rows use no DoRA or IA3
adapter never touches these stores.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry.errors import InvalidModel
from ..registry.peft import (
    DORA,
    IA3,
    LORA,
    PART_NAMES,
    PARTS_OF,
    adapter_kind,
    is_feedforward,
    tensor_part,
)

LORA_TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    """An adapter that cannot be applied to this base model."""


@dataclass(slots=True)
class LoraWeights:
    """One adapter in host memory: per module path, A ``[r, in]`` and B ``[out, r]`` (LoRA
    and DoRA), DoRA's magnitude ``[out]``, IA3's vector (``"in"`` ``[in]`` for feedforward
    targets, ``"out"`` ``[out]`` for the others)."""

    key: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kind: str = LORA
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    vectors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.pairs.values() for t in pair]
        tensors += [*self.magnitudes.values(), *(v for _, v in self.vectors.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def modules(self) -> set[str]:
        return set(self.pairs) | set(self.vectors)


def read_peft_adapter(config: dict[str, Any], weights: Path, key: str) -> LoraWeights:
    """Reads a PEFT adapter (LoRA, rsLoRA, DoRA or IA3): its adapter_config.json (parsed)
    and safetensors file. Raises LoraError for anything else, for a tensor that is not a
    part of its type, a module missing a part, a wrong shape, or a NaN / infinite value."""
    from safetensors.torch import load_file

    try:
        kind = adapter_kind({"peft_type": "LORA"} | config)
    except InvalidModel as exc:
        raise LoraError(str(exc)) from None
    tensors = load_file(str(weights), device="cpu")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = tensor_part(name)
        if parsed is None or parsed[1] not in PARTS_OF[kind]:
            raise LoraError(f"adapter tensor {name[:100]!r} is not a {kind.upper()} weight")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"adapter tensor {name[:100]!r} holds NaN or infinite values")
        found.setdefault(parsed[0], {})[parsed[1]] = tensor
    for module, parts in found.items():
        if set(parts) != PARTS_OF[kind]:
            missing = ", ".join(sorted(PART_NAMES[p] for p in PARTS_OF[kind] - set(parts)))
            raise LoraError(f"adapter module {module[:100]!r} lacks its {missing}")
    if kind == IA3:
        vectors: dict[str, tuple[str, torch.Tensor]] = {}
        for module, parts in found.items():
            vector, feedforward = parts["L"], is_feedforward(config, module)
            if vector.dim() != 2 or vector.shape[0 if feedforward else 1] != 1:
                raise LoraError(
                    f"IA3 vector of {module[:100]!r} has shape {list(vector.shape)}, not the "
                    + ("[1, in] of a feedforward module" if feedforward else "[out, 1]")
                )
            vectors[module] = ("in" if feedforward else "out", vector.reshape(-1))
        return LoraWeights(key=key, rank=0, scale=0.0, kind=IA3, vectors=vectors)
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    rslora = bool(config.get("use_rslora", False))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for module, parts in found.items():
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoraError(f"adapter module {module[:100]!r} does not have rank {rank}")
        pairs[module] = (a, b)
        if kind == DORA:
            magnitude = parts["M"]
            if magnitude.dim() != 1 or magnitude.shape[0] != b.shape[0]:
                raise LoraError(
                    f"DoRA magnitude of {module[:100]!r} has shape {list(parts['M'].shape)}, "
                    f"not [{b.shape[0]}]"
                )
            magnitudes[module] = magnitude
    return LoraWeights(
        key=key, rank=rank, scale=scale, pairs=pairs, kind=kind, magnitudes=magnitudes
    )


class LoraRows:
    """Which adapter slot each row of the current forward uses, shared by every wrapped
    projection of one model. Set by the runner around a forward; ``mask`` is None when no
    row uses a LoRA / DoRA update, ``index`` None when no row uses DoRA or IA3 vectors."""

    __slots__ = ("index", "mask", "width")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, 1, width * rank]: scale on own columns
        self.width = 0  # slots 0..width-1 take part in this forward
        self.index: torch.Tensor | None = None  # [B] long: each row's vector store row

    @property
    def active(self) -> bool:
        return self.mask is not None or self.index is not None


DORA_CHUNK = 1024  # weight rows (or columns) computed at a time for DoRA's norms


def dora_norms(
    module: Any, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """||W + scale B A||_row in float32 [out], W the weight ``module`` computes with: a dense
    module's own, a compressed module's dequantized rows, or (a module that keeps only its
    kernel's layout, such as int4 repacked for CUDA) its columns read back through its
    forward on unit vectors in ``dtype``. ``a`` [r, in], ``b`` [out, r] in float32."""
    out_f = int(module.out_features)
    if isinstance(module, nn.Linear) or getattr(module, "rows", None) is not None:
        norms = torch.empty(out_f, dtype=torch.float32, device=a.device)
        try:
            for start in range(0, out_f, DORA_CHUNK):
                stop = min(start + DORA_CHUNK, out_f)
                weight = _weight_rows(module, start, stop).to(a.device)  # [rows, in]
                weight = weight + scale * (b[start:stop] @ a)
                norms[start:stop] = torch.linalg.norm(weight, dim=1)
            return norms
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            # no stored layout to read rows from: read columns through the forward
    in_f = int(module.in_features)
    bias = getattr(module, "bias", None)
    squares = torch.zeros(out_f, dtype=torch.float32, device=a.device)
    for start in range(0, in_f, DORA_CHUNK):
        stop = min(start + DORA_CHUNK, in_f)
        units = torch.zeros((stop - start, in_f), dtype=dtype, device=a.device)
        units[:, start:stop].fill_diagonal_(1.0)
        columns = type(module).forward(module, units).float()  # [cols, out] = W[:, cols]^T
        if bias is not None:
            columns = columns - bias.float()
        columns = columns + scale * (a[:, start:stop].t() @ b.t())
        squares += columns.square().sum(dim=0)
    return squares.sqrt()


def _weight_rows(module: Any, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the weight in float32 (a compressed module's dequantized rows)."""
    if isinstance(module, nn.Linear):
        return module.weight[start:stop].float()
    # an int4 module whose CPU kernel layout replaced its stored one rebuilds that to read
    # rows; it is released again after, not kept beside the kernel's copy
    released = getattr(module, "qweight", False) is None
    device = getattr(module, "device", None)
    try:
        ids = torch.arange(start, stop, device=device if device is not None else "cpu")
        return module.rows(ids, torch.float32).float()
    finally:
        if released:
            module.qweight = None


class LoraLinear:
    """The batched adapters of one projection's slots. It is not a module around the
    projection: it replaces the projection's ``forward`` (an instance attribute, the class's
    own forward still computes the base), so a batch without adapters pays one attribute
    check per projection, not an extra module call."""

    def __init__(self, base: nn.Module, rows: LoraRows, in_features: int, out_features: int):
        # weak both ways round the patched forward: no reference cycle keeps an evicted
        # model's weights alive until the garbage collector happens to run
        self._base = weakref.ref(base)
        self.rows = rows
        self.in_features = in_features
        self.out_features = out_features
        self.lora_a: torch.Tensor | None = None  # [slots * rank, in]
        self.lora_b: torch.Tensor | None = None  # [slots * rank, out]
        self.rank = 0
        # DoRA / IA3 vectors, made when the first adapter needing one arrives:
        # [slots + 1, in] / [slots + 1, out] / [slots + 1, out], identity rows elsewhere
        self.in_scale: torch.Tensor | None = None
        self.out_scale: torch.Tensor | None = None
        self.out_shift: torch.Tensor | None = None
        self.scaled = False  # any of them exists
        base_forward = type(base).forward
        base_ref = self._base
        self.base_forward = lambda x: base_forward(base_ref(), x)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.scaled and rows.index is not None:
                return self.adapt(x, None)
            y = base_forward(base_ref(), x)
            delta = self.delta(x)
            return y if delta is None else y + delta

        base.forward = forward

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's low-rank update for input ``x`` [B, q, in] -> [B, q, out]; None when
        no row of this forward uses an adapter with one."""
        mask = self.rows.mask
        if mask is None or self.lora_a is None or self.lora_b is None:
            return None
        cols = self.rows.width * self.rank
        # x: [B, q, in] -> xa: [B, q, cols]; mask: [B, 1, cols]; delta: [B, q, out]
        xa = torch.nn.functional.linear(x, self.lora_a[:cols]) * mask
        return torch.matmul(xa, self.lora_b[:cols])

    def adapt(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The projection's output for ``x`` [B, q, in] with each row's adapter; ``y``: the
        base's output for ``x`` when the caller has it (a fused projection), else None."""
        index = self.rows.index
        if not self.scaled or index is None:
            delta = self.delta(x)
            y = self.base_forward(x) if y is None else y
            return y if delta is None else y + delta
        if self.in_scale is not None:  # IA3 feedforward rows scale their input; others by 1
            # in_scale[index]: [B, in] -> [B, 1, in]
            y = self.base_forward(x * self.in_scale.index_select(0, index).unsqueeze(1))
        elif y is None:
            y = self.base_forward(x)
        delta = self.delta(x)  # rows with an input scale have no low-rank update
        if delta is not None:
            y = y + delta
        if self.out_scale is not None:  # [B, 1, out]
            y = y * self.out_scale.index_select(0, index).unsqueeze(1)
        if self.out_shift is not None:
            y = y + self.out_shift.index_select(0, index).unsqueeze(1)
        return y

    @property
    def base(self) -> nn.Module | None:
        return self._base()

    def allocate(self, slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """(Re)allocates ``slots`` zeroed slots of ``rank``, keeping what the old slots held."""
        self.adopt(*self.grown(slots, rank, dtype, device), rank)

    def grown(
        self, slots: int, rank: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New A and B stores for ``slots`` slots of ``rank`` holding the old slots' weights
        (nothing changes here until :meth:`adopt`)."""
        a = torch.zeros((slots * rank, self.in_features), dtype=dtype, device=device)
        b = torch.zeros((slots * rank, self.out_features), dtype=dtype, device=device)
        if self.lora_a is not None and self.lora_b is not None:
            old = self.rank
            for s in range(min(slots, self.lora_a.shape[0] // max(old, 1))):
                a[s * rank : s * rank + old] = self.lora_a[s * old : (s + 1) * old]
                b[s * rank : s * rank + old] = self.lora_b[s * old : (s + 1) * old]
        return a, b

    def adopt(self, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
        self.lora_a, self.lora_b, self.rank = a, b, rank

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Puts an adapter's A [r, in] and B [out, r] in ``slot`` (None clears the slot)."""
        if self.lora_a is None or self.lora_b is None:
            if a is None:
                return  # nothing stored, nothing to clear
            raise LoraError("adapter slots are not allocated yet")
        start = slot * self.rank
        self.lora_a[start : start + self.rank].zero_()
        self.lora_b[start : start + self.rank].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        self.lora_a[start : start + r].copy_(a)
        self.lora_b[start : start + r].copy_(b.t())

    def write_vectors(
        self,
        slot: int,
        slots: int,
        in_scale: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
        out_shift: torch.Tensor | None = None,
    ) -> None:
        """Puts a DoRA / IA3 adapter's vectors in ``slot`` (None: that store's identity),
        making a store on the first vector it must hold."""
        for name, vector, width, fill in (
            ("in_scale", in_scale, self.in_features, 1.0),
            ("out_scale", out_scale, self.out_features, 1.0),
            ("out_shift", out_shift, self.out_features, 0.0),
        ):
            store: torch.Tensor | None = getattr(self, name)
            if store is None:
                if vector is None:
                    continue
                store = torch.full((slots + 1, width), fill, dtype=vector.dtype)
                store = store.to(vector.device)
                setattr(self, name, store)
                self.scaled = True
            if vector is None:
                store[slot].fill_(fill)
            else:
                store[slot].copy_(vector)

    def dora_scale(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        magnitude: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DoRA's per-output factor magnitude / ||W + scale B A||_row over the weight the
        base computes with (in ``dtype``, the forward's), and the shift (1 - factor) * bias
        that keeps the bias unscaled (None without a bias); float32 [out] each."""
        base: Any = self.base
        with torch.no_grad():
            norms = dora_norms(base, a.float(), b.float(), scale, dtype)
            factor = magnitude.float().to(a.device) / norms
        if not bool(torch.isfinite(factor).all()):
            raise LoraError("the DoRA adapter's weight norms are zero or not finite")
        bias = getattr(base, "bias", None)
        shift = None if bias is None else (1.0 - factor) * bias.detach().float().to(a.device)
        return factor, shift

    @property
    def nbytes(self) -> int:
        stores = [self.lora_a, self.lora_b, self.in_scale, self.out_scale, self.out_shift]
        return sum(t.numel() * t.element_size() for t in stores if t is not None)


class LoraBank:
    """The adapter slots of one model: wraps the projections adapters target (on first
    use) and writes adapters into slots. Only the engine thread calls it, between forwards."""

    def __init__(
        self, model: nn.Module, slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.slots = slots
        self.dtype = dtype
        self.device = device
        self.rank = 0
        self.rows = LoraRows()
        self.layers: dict[str, LoraLinear] = {}
        self.scales = [0.0] * slots
        self.vectored = [False] * slots  # the slot's adapter has DoRA / IA3 vectors
        self.nbytes = 0  # kept as a number: other threads read it while layers change

    def check(self, weights: LoraWeights) -> None:
        """Raises LoraError unless every module the adapter targets is a projection of
        matching shape."""
        modules = dict(self.model.named_modules())
        for path in weights.modules:
            module = modules.get(path)
            if "experts" in path.split(".") or "shared_expert" in path:
                raise LoraError(
                    f"adapters on mixture-of-experts modules ({path[:100]!r}) are not served"
                )
            if module is not None and hasattr(module, "in_features"):
                in_f, out_f = int(module.in_features), int(module.out_features)
            else:
                raise LoraError(f"adapter targets {path[:100]!r}, not a projection of the base")
            shapes: list[tuple[list[int], tuple[int, ...]]] = []
            pair = weights.pairs.get(path)
            if pair is not None:
                a, b = pair
                shapes += [(list(a.shape[1:]), (in_f,)), (list(b.shape[:1]), (out_f,))]
            if path in weights.magnitudes:
                shapes.append((list(weights.magnitudes[path].shape), (out_f,)))
            if path in weights.vectors:
                side, vector = weights.vectors[path]
                shapes.append((list(vector.shape), (in_f,) if side == "in" else (out_f,)))
            for got, wanted in shapes:
                if tuple(got) != wanted:
                    raise LoraError(
                        f"adapter weights for {path[:100]!r} do not fit the base projection "
                        f"{in_f} -> {out_f}"
                    )
            if weights.kind == DORA and path not in weights.magnitudes:
                raise LoraError(f"the DoRA adapter lacks the magnitude of {path[:100]!r}")

    def _wrap(self, path: str) -> LoraLinear:
        layer = self.layers.get(path)
        if layer is not None:
            return layer
        base: Any = self.model.get_submodule(path)
        layer = LoraLinear(base, self.rows, int(base.in_features), int(base.out_features))
        if self.rank:
            layer.allocate(self.slots, self.rank, self.dtype, self.device)
        self.layers[path] = layer
        return layer

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Writes ``weights`` into ``slot`` of every projection (clearing the slot in the
        projections this adapter does not target)."""
        self.check(weights)
        if weights.rank > self.rank:
            # every store is grown before any is replaced: running out of memory here leaves
            # the bank as it was
            rank = weights.rank
            grown = {
                path: layer.grown(self.slots, rank, self.dtype, self.device)
                for path, layer in self.layers.items()
            }
            for path, (a, b) in grown.items():
                self.layers[path].adopt(a, b, rank)
            self.rank = rank
        for path in sorted(weights.modules):
            self._wrap(path)
        self.vectored[slot] = False  # until every vector is in place
        vectors = self._vectors(weights)  # DoRA's norms: raises before anything is written
        for path, layer in self.layers.items():
            pair = weights.pairs.get(path)
            if pair is None:
                layer.write(slot, None, None)
            else:
                layer.write(slot, pair[0].to(self.dtype), pair[1].to(self.dtype))
            layer.write_vectors(slot, self.slots, *vectors.get(path, (None, None, None)))
        self.nbytes = sum(layer.nbytes for layer in self.layers.values())
        self.scales[slot] = weights.scale
        self.vectored[slot] = bool(vectors)

    def _vectors(
        self, weights: LoraWeights
    ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """Per projection, the (in_scale, out_scale, out_shift) rows of a DoRA or IA3
        adapter, on the device in the bank's dtype."""
        out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
        for path, (side, vector) in weights.vectors.items():
            vector = vector.to(self.device, self.dtype)
            out[path] = (vector, None, None) if side == "in" else (None, vector, None)
        for path, magnitude in weights.magnitudes.items():
            a, b = (t.to(self.device) for t in weights.pairs[path])  # norms in float32
            factor, shift = self.layers[path].dora_scale(a, b, weights.scale, magnitude, self.dtype)
            out[path] = (
                None,
                factor.to(self.dtype),
                None if shift is None else shift.to(self.dtype),
            )
        return out

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write(slot, None, None)
            layer.write_vectors(slot, self.slots)
        self.scales[slot] = 0.0
        self.vectored[slot] = False

    def select(self, slots: list[int] | None) -> None:
        """Sets which slot each row of the next forward uses (-1: none)."""
        self.reset()
        if not slots or max(slots) < 0:
            return
        if self.rank and any(slot >= 0 and self.scales[slot] for slot in slots):
            width = max(slots) + 1
            mask = torch.zeros((len(slots), 1, width * self.rank), dtype=self.dtype)
            for row, slot in enumerate(slots):
                if slot >= 0:
                    mask[row, 0, slot * self.rank : (slot + 1) * self.rank] = self.scales[slot]
            self.rows.mask = mask.to(self.device)
            self.rows.width = width
        if any(slot >= 0 and self.vectored[slot] for slot in slots):
            # rows without vectors read the identity row ``slots``
            index = [slot if slot >= 0 else self.slots for slot in slots]
            self.rows.index = torch.tensor(index, dtype=torch.long).to(self.device)

    def reset(self) -> None:
        self.rows.mask = None
        self.rows.index = None

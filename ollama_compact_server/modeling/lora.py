"""Batched adapters: projections that apply, for every row of a batch, the adapter that row
asked for (LoRA, rsLoRA, DoRA or IA3), so requests for different adapters share one forward.

Each wrapped projection keeps the adapters of its device slots side by side: ``A`` is
``[slots * rank, in]`` and ``B`` is ``[slots * rank, out]`` (slot ``s`` owns rows
``s * rank .. (s + 1) * rank``; lower ranks are zero-padded). One forward computes
``x @ A.T`` for every resident adapter at once, keeps each row's own adapter's columns
(a mask that also carries alpha / r), and multiplies by ``B``: two GEMMs per projection
whatever the mix of adapters (the gather-free form of S-LoRA / Punica's segment GEMM).
Rows without an adapter get exact zeros; a batch without any adapter skips the work.

DoRA and IA3 add per-row vectors (modeling/vectors.py: one store for every projection,
gathered once per forward by each row's slot): ``y = out_scale * (base(in_scale * x) +
lora) + out_shift``, identities for rows without such an adapter. DoRA's LoRA update goes
through the A / B stores and its out_scale is magnitude / ||W + s B A||_row (computed once,
when the adapter is placed, from the weight the base computes with), with out_shift
(1 - out_scale) * bias keeping the bias unscaled; IA3 scales the output of its other targets
(bias included) and the input of its feedforward ones. A forward whose rows use no DoRA or
IA3 adapter never touches the vectors.
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
    LABELS,
    LORA,
    PART_NAMES,
    PARTS_OF,
    adapter_kind,
    is_feedforward,
    tensor_part,
)
from .vectors import VectorStore, dora_norms

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
            raise LoraError(f"adapter tensor {name[:100]!r} is not a {LABELS[kind]} weight")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"adapter tensor {name[:100]!r} holds NaN or infinite values")
        found.setdefault(parsed[0], {})[parsed[1]] = tensor
    for module, parts in found.items():
        if set(parts) != PARTS_OF[kind]:
            missing = ", ".join(sorted(PART_NAMES[p] for p in PARTS_OF[kind] - set(parts)))
            raise LoraError(
                f"the {LABELS[kind]} adapter's module {module[:100]!r} lacks its {missing}"
            )
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
    row uses a LoRA / DoRA update, ``vectors`` None when no row uses DoRA or IA3 ones."""

    __slots__ = ("mask", "vectors", "width")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, 1, width * rank]: scale on own columns
        self.width = 0  # slots 0..width-1 take part in this forward
        self.vectors: torch.Tensor | None = None  # [B, store width]: each row's vectors

    @property
    def active(self) -> bool:
        return self.mask is not None or self.vectors is not None


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
        # first columns of its DoRA / IA3 vectors in the bank's store, once an adapter
        # placed one: in_scale [in], out_scale [out], out_shift [out]
        self.in_at: int | None = None
        self.out_at: int | None = None
        self.shift_at: int | None = None
        self.scaled = False  # any of them is placed
        base_forward = type(base).forward
        base_ref = self._base
        self.base_forward = lambda x: base_forward(base_ref(), x)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.scaled and rows.vectors is not None:
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
        vectors = self.rows.vectors  # [B, store width]
        if not self.scaled or vectors is None:
            delta = self.delta(x)
            y = self.base_forward(x) if y is None else y
            return y if delta is None else y + delta
        if self.in_at is not None:  # IA3 feedforward rows scale their input; others by 1
            scale = vectors[:, None, self.in_at : self.in_at + self.in_features]  # [B, 1, in]
            y = self.base_forward(x * scale)
        elif y is None:
            y = self.base_forward(x)
        delta = self.delta(x)  # rows with an input scale have no low-rank update
        if delta is not None:
            y = y + delta
        if self.out_at is not None:
            out = vectors[:, None, self.out_at : self.out_at + self.out_features]  # [B, 1, out]
            if self.shift_at is None:
                return y * out
            shift = vectors[:, None, self.shift_at : self.shift_at + self.out_features]
            return torch.addcmul(shift, y, out)  # shift + y * out
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
        if self.lora_a is None or self.lora_b is None:
            return 0
        return (self.lora_a.numel() + self.lora_b.numel()) * self.lora_a.element_size()


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
        self.vectors = VectorStore(slots, dtype, device)
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
        self._place(vectors)
        for path, layer in self.layers.items():
            pair = weights.pairs.get(path)
            if pair is None:
                layer.write(slot, None, None)
            else:
                layer.write(slot, pair[0].to(self.dtype), pair[1].to(self.dtype))
        columns = {
            getattr(self.layers[path], attr): vector
            for path, parts in vectors.items()
            for attr, vector in parts.items()
        }
        self.vectors.write(slot, columns)
        self.nbytes = sum(layer.nbytes for layer in self.layers.values()) + self.vectors.nbytes
        self.scales[slot] = weights.scale
        self.vectored[slot] = bool(vectors)

    def _vectors(self, weights: LoraWeights) -> dict[str, dict[str, torch.Tensor]]:
        """Per projection, a DoRA or IA3 adapter's vectors by the LoraLinear attribute
        naming their column (in_at: in_scale, out_at: out_scale, shift_at: out_shift), on
        the device in the bank's dtype."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, (side, vector) in weights.vectors.items():
            out[path] = {"in_at" if side == "in" else "out_at": vector.to(self.device, self.dtype)}
        for path, magnitude in weights.magnitudes.items():
            a, b = (t.to(self.device) for t in weights.pairs[path])  # norms in float32
            factor, shift = self.layers[path].dora_scale(a, b, weights.scale, magnitude, self.dtype)
            out[path] = {"out_at": factor.to(self.dtype)}
            if shift is not None:
                out[path]["shift_at"] = shift.to(self.dtype)
        return out

    def _place(self, vectors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Columns in the vector store for the vectors no adapter placed before."""
        owners: list[tuple[LoraLinear, str]] = []
        spans: list[tuple[int, float]] = []
        for path, parts in vectors.items():
            layer = self.layers[path]
            for attr, vector in parts.items():
                if getattr(layer, attr) is None:
                    owners.append((layer, attr))
                    spans.append((vector.numel(), 0.0 if attr == "shift_at" else 1.0))
        if not spans:
            return
        for (layer, attr), at in zip(owners, self.vectors.reserve(spans)):
            setattr(layer, attr, at)
            layer.scaled = True

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write(slot, None, None)
        self.vectors.write(slot, {})
        self.scales[slot] = 0.0
        self.vectored[slot] = False

    def select(self, slots: list[int] | None) -> None:
        """Sets which slot each row of the next forward uses (-1: none)."""
        self.reset()
        if not slots or max(slots) < 0:
            return
        lora = [slot >= 0 and self.scales[slot] > 0 for slot in slots]  # IA3 rows: none
        if self.rank and any(lora):
            width = max(slot for slot, low_rank in zip(slots, lora) if low_rank) + 1
            mask = torch.zeros((len(slots), 1, width * self.rank), dtype=self.dtype)
            for row, slot in enumerate(slots):
                if lora[row]:
                    mask[row, 0, slot * self.rank : (slot + 1) * self.rank] = self.scales[slot]
            self.rows.mask = mask.to(self.device)
            self.rows.width = width
        if any(slot >= 0 and self.vectored[slot] for slot in slots):
            self.rows.vectors = self.vectors.gather(slots)  # one gather for every projection

    def reset(self) -> None:
        self.rows.mask = None
        self.rows.vectors = None

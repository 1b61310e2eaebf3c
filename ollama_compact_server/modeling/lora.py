"""Batched LoRA: projections that add, for every row of a batch, the low-rank update of
the adapter that row asked for, so requests for different adapters share one forward.

Each wrapped projection keeps the adapters of its device slots side by side: ``A`` is
``[slots * rank, in]`` and ``B`` is ``[slots * rank, out]`` (slot ``s`` owns rows
``s * rank .. (s + 1) * rank``; lower ranks are zero-padded). One forward computes
``x @ A.T`` for every resident adapter at once, keeps each row's own adapter's columns
(a mask that also carries alpha / r), and multiplies by ``B``: two GEMMs per projection
whatever the mix of adapters (the gather-free form of S-LoRA / Punica's segment GEMM).
Rows without an adapter get exact zeros; a batch without any adapter skips the work.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    """An adapter that cannot be applied to this base model."""


@dataclass(slots=True)
class LoraWeights:
    """One adapter in host memory: per module path, A ``[r, in]`` and B ``[out, r]``."""

    key: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.pairs.values()
        )


def read_peft_adapter(config: dict[str, Any], weights: Path, key: str) -> LoraWeights:
    """Reads a PEFT LoRA adapter: its adapter_config.json (parsed) and safetensors file."""
    from safetensors.torch import load_file

    if str(config.get("peft_type", "LORA")).upper() != "LORA" or config.get("use_dora"):
        raise LoraError("only plain LoRA adapters can be served (not DoRA, IA3 or others)")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    rslora = bool(config.get("use_rslora", False))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    tensors = load_file(str(weights), device="cpu")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem = name.removeprefix("base_model.model.")
        for marker, part in ((".lora_A.", "A"), (".lora_B.", "B")):
            if marker in stem:
                found.setdefault(stem.split(marker, 1)[0], {})[part] = tensor
                break
        else:
            raise LoraError(f"adapter tensor {name[:100]!r} is not a LoRA A/B weight")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise LoraError(f"adapter module {module[:100]!r} lacks its A or B weight")
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoraError(f"adapter module {module[:100]!r} does not have rank {rank}")
        pairs[module] = (a, b)
    return LoraWeights(key=key, rank=rank, scale=scale, pairs=pairs)


class LoraRows:
    """Which adapter slot each row of the current forward uses, shared by every wrapped
    projection of one model. Set by the runner around a forward; ``mask`` is None when no
    row uses an adapter."""

    __slots__ = ("mask", "width")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, 1, width * rank]: scale on own columns
        self.width = 0  # slots 0..width-1 take part in this forward


class LoraLinear:
    """The batched low-rank updates of one projection's adapter slots. It is not a module
    around the projection: it replaces the projection's ``forward`` (an instance attribute,
    the class's own forward still computes the base), so a batch without adapters pays one
    attribute check per projection, not an extra module call."""

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
        base_forward = type(base).forward
        base_ref = self._base

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = base_forward(base_ref(), x)
            delta = self.delta(x)
            return y if delta is None else y + delta

        base.forward = forward

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's low-rank update for input ``x`` [B, q, in] -> [B, q, out]; None when
        no row of this forward uses an adapter (a fused projection adds it itself)."""
        mask = self.rows.mask
        if mask is None or self.lora_a is None or self.lora_b is None:
            return None
        cols = self.rows.width * self.rank
        # x: [B, q, in] -> xa: [B, q, cols]; mask: [B, 1, cols]; delta: [B, q, out]
        xa = torch.nn.functional.linear(x, self.lora_a[:cols]) * mask
        return torch.matmul(xa, self.lora_b[:cols])

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
            raise LoraError("adapter slots are not allocated yet")
        start = slot * self.rank
        self.lora_a[start : start + self.rank].zero_()
        self.lora_b[start : start + self.rank].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        self.lora_a[start : start + r].copy_(a)
        self.lora_b[start : start + r].copy_(b.t())

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
        self.nbytes = 0  # kept as a number: other threads read it while layers change

    def check(self, weights: LoraWeights) -> None:
        """Raises LoraError unless every module the adapter targets is a projection of
        matching shape."""
        modules = dict(self.model.named_modules())
        for path, (a, b) in weights.pairs.items():
            module = modules.get(path)
            if "experts" in path.split(".") or "shared_expert" in path:
                raise LoraError(
                    f"LoRA on mixture-of-experts modules ({path[:100]!r}) is not served"
                )
            if module is not None and hasattr(module, "in_features"):
                in_f, out_f = int(module.in_features), int(module.out_features)
            else:
                raise LoraError(f"adapter targets {path[:100]!r}, not a projection of the base")
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise LoraError(
                    f"adapter weights for {path[:100]!r} are {list(a.shape)} / {list(b.shape)}, "
                    f"which do not fit the base projection {in_f} -> {out_f}"
                )

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
        for path in weights.pairs:
            self._wrap(path)
        self.nbytes = sum(layer.nbytes for layer in self.layers.values())
        for path, layer in self.layers.items():
            pair = weights.pairs.get(path)
            if pair is None:
                layer.write(slot, None, None)
            else:
                layer.write(slot, pair[0].to(self.dtype), pair[1].to(self.dtype))
        self.scales[slot] = weights.scale

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write(slot, None, None)
        self.scales[slot] = 0.0

    def select(self, slots: list[int] | None) -> None:
        """Sets which slot each row of the next forward uses (-1: none)."""
        if not slots or max(slots) < 0 or not self.rank:
            self.rows.mask = None
            return
        width = max(slots) + 1
        mask = torch.zeros((len(slots), 1, width * self.rank), dtype=self.dtype)
        for row, slot in enumerate(slots):
            if slot >= 0:
                mask[row, 0, slot * self.rank : (slot + 1) * self.rank] = self.scales[slot]
        self.rows.mask = mask.to(self.device)
        self.rows.width = width

    def reset(self) -> None:
        self.rows.mask = None

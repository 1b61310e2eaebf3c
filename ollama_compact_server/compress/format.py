"""The stored form of a compressed model: which module is stored how, recorded in the
``model.safetensors`` metadata (tensors are named ``<module>.<field>``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

FORMAT_KEY = "ocs.format"
FORMAT_VERSION = "compressed-v1"
MODULES_KEY = "ocs.modules"
SHAPES_KEY = "ocs.shapes"  # the parent's weight shapes, for adapter checks
KINDS = ("int8", "int4", "int2", "nf4", "lowrank", "dense", "tied")
GROUPED_KINDS = ("int4", "int2", "nf4")  # kinds with a scale record per group of input columns


@dataclass(slots=True)
class ModuleSpec:
    kind: str
    in_features: int
    out_features: int
    group_size: int = 0
    rank: int = 0
    embedding: bool = False  # an input embedding table ([vocab, hidden] as out x in)
    source: str = ""  # kind "tied": the module whose tensors it shares

    def bits_per_weight(self) -> float:
        """Storage cost, for size targets (scales and zeros included)."""
        if self.kind == "int8":
            return 8.0 + 16.0 / max(self.in_features, 1)
        if self.kind in GROUPED_KINDS:
            bits = 2.0 if self.kind == "int2" else 4.0
            return bits + 32.0 / max(self.group_size, 1)  # bf16 scale + zero (nf4: f32 absmax)
        if self.kind == "lowrank":
            n, k = self.out_features, self.in_features
            return 32.0 * self.rank * (n + k) / (n * k)
        if self.kind == "tied":
            return 0.0
        return 32.0


def specs_to(specs: dict[str, ModuleSpec]) -> str:
    return json.dumps({name: asdict(spec) for name, spec in specs.items()}, sort_keys=True)


def specs_from(data: Any) -> dict[str, ModuleSpec]:
    if not isinstance(data, dict):
        raise ValueError("compressed model metadata: modules must be an object")
    specs = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise ValueError(f"compressed model metadata: bad entry for {str(name)[:80]}")
        specs[str(name)] = ModuleSpec(**{k: entry[k] for k in ModuleSpec.__slots__ if k in entry})
    return specs

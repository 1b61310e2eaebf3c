"""Training settings: their defaults, limits and checks (no torch here: the API checks a
request with them before any work)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("lora", "dora", "ia3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


class TrainingError(ValueError):
    """Settings or a checkpoint that cannot be used (a 400)."""


@dataclass(slots=True)
class TrainParams:
    method: str = "lora"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every attention and MLP projection
    epochs: float = 1.0
    max_steps: int = 0  # 0: epochs decide
    learning_rate: float = 0.0  # 0: 2e-4 for LoRA / DoRA, 3e-3 for IA3
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    eval_split: float = 0.1
    seed: int = 0
    warmup_ratio: float = 0.03
    save_steps: int = 50  # a checkpoint every this many steps (and when stopped)

    @property
    def lr(self) -> float:
        if self.learning_rate > 0:
            return self.learning_rate
        return 3e-3 if self.method == "ia3" else 2e-4

    def targets(self) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        return list(IA3_TARGETS if self.method == "ia3" else LORA_TARGETS)

    def comparable(self) -> dict[str, Any]:
        """What a checkpoint must share with a run that resumes it (not the length)."""
        values = asdict(self)
        for key in ("epochs", "max_steps", "save_steps"):
            values.pop(key)
        return values


LIMITS: dict[str, tuple[float, float]] = {
    "rank": (1, 1024),
    "alpha": (1, 1_000_000),
    "dropout": (0.0, 0.9),
    "epochs": (0.0, 1000.0),
    "max_steps": (0, 10_000_000),
    "learning_rate": (0.0, 1.0),
    "batch_size": (1, 1024),
    "grad_accum": (1, 1024),
    "max_length": (8, 131072),
    "eval_split": (0.0, 0.5),
    "seed": (0, 2**31 - 1),
    "warmup_ratio": (0.0, 0.5),
    "save_steps": (1, 10_000_000),
}


def check_params(values: dict[str, Any]) -> TrainParams:
    """TrainParams from a client's options; raises TrainingError naming the field."""
    known = {f.name: f for f in fields(TrainParams)}
    params = TrainParams()
    for key, value in values.items():
        if value is None:
            continue
        if key not in known:
            raise TrainingError(f"unknown training option {key!r} (known: {', '.join(known)})")
        if key == "method":
            if not isinstance(value, str) or value.lower() not in METHODS:
                raise TrainingError(f"method must be one of {', '.join(METHODS)}")
            value = value.lower()
        elif key == "target_modules":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and v.replace("_", "").isalnum() for v in value)
            ):
                raise TrainingError("target_modules must be module names such as q_proj,v_proj")
        else:
            low, high = LIMITS[key]
            integer = isinstance(getattr(params, key), int)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TrainingError(f"{key} must be a number")
            if integer and value != int(value):
                raise TrainingError(f"{key} must be a whole number")
            if not math.isfinite(value) or not low <= value <= high:
                raise TrainingError(f"{key}={value} is out of range ({low:g} to {high:g})")
            value = int(value) if integer else float(value)
        setattr(params, key, value)
    if params.epochs <= 0 and params.max_steps <= 0:
        raise TrainingError("give epochs or max_steps above zero")
    return params

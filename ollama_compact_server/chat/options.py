"""Request options (Ollama `options`, Modelfile PARAMETERs, OpenAI fields) normalised once
into engine sampling parameters: defaults, then model parameters, then the request."""

from __future__ import annotations

import logging
import math
from typing import Any

from ..engine.types import SamplingParams
from .errors import ChatError

log = logging.getLogger(__name__)

MAX_STOPS = 16
MAX_STOP_CHARS = 256

# Ollama's defaults (api/types.go DefaultOptions)
DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": -1,
    "num_predict": -1,
    "stop": [],
}
FLOATS = {
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
}
INTS = {"top_k", "repeat_last_n", "seed", "num_predict"}
# accepted and ignored (type-checked all the same): load-time or removed knobs real
# clients still send
IGNORED_INTS = {
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "mirostat",
    "draft_num_predict",
}
IGNORED_FLOATS = {"typical_p", "mirostat_tau", "mirostat_eta", "tfs_z"}
IGNORED_BOOLS = {
    "use_mmap",
    "use_mlock",
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "numa",
}
IGNORED = IGNORED_INTS | IGNORED_FLOATS | IGNORED_BOOLS


class OptionError(ChatError):
    """An option of the wrong type or out of range (a 400)."""


def _number(key: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(
            f'option "{key}" must be of type {"integer" if kind is int else "number"}'
        )
    if not math.isfinite(value):
        raise OptionError(f'option "{key}" must be finite')
    if kind is int:
        if value != int(value) or abs(value) > 2**63:
            raise OptionError(f'option "{key}" must be of type integer')
        return int(value)
    return float(value)


def merge_options(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win; unknown keys are logged and dropped; types are checked."""
    merged = dict(DEFAULTS)
    for layer in layers:
        if not layer:
            continue
        if not isinstance(layer, dict):
            raise OptionError("options must be an object")
        for key, value in layer.items():
            if value is None:
                continue  # null is absent: the layer below (or the default) stays
            if key in FLOATS:
                merged[key] = _number(key, value, float)
            elif key in INTS:
                merged[key] = _number(key, value, int)
            elif key == "stop":
                merged["stop"] = stop_list(value)
            elif key in IGNORED_INTS:
                _number(key, value, int)
            elif key in IGNORED_FLOATS:
                _number(key, value, float)
            elif key in IGNORED_BOOLS:
                if not isinstance(value, bool):
                    raise OptionError(f'option "{key}" must be of type boolean')
            else:
                log.info("ignoring unknown option %r", key[:40])
    return merged


def stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionError("stop must be a string or a list of strings")
    if len(value) > MAX_STOPS:
        raise OptionError(f"at most {MAX_STOPS} stop sequences are allowed")
    if any(len(v) > MAX_STOP_CHARS for v in value):
        raise OptionError(f"stop sequences are limited to {MAX_STOP_CHARS} characters")
    return [v for v in value if v]


def to_sampling(options: dict[str, Any]) -> SamplingParams:
    seed = options["seed"]
    num_predict = options["num_predict"]
    return SamplingParams(
        temperature=options["temperature"],
        top_k=max(0, options["top_k"]),
        top_p=options["top_p"],
        min_p=options["min_p"],
        repeat_penalty=options["repeat_penalty"],
        repeat_last_n=options["repeat_last_n"],
        presence_penalty=options["presence_penalty"],
        frequency_penalty=options["frequency_penalty"],
        seed=None if seed is None or seed < 0 else seed,
        max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
        stop=list(options["stop"]),
    )

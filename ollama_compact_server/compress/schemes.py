"""The compression schemes: names, options (validated, with typed errors that list what is
supported), and the plan each scheme makes for a model's linear layers and embeddings."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class SchemeError(ValueError):
    """Bad compression request (unknown scheme or option, impossible value): HTTP 400."""

    status = 400


@dataclass(frozen=True, slots=True)
class Option:
    kind: type
    default: Any
    choices: tuple[Any, ...] = ()
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    help: str = ""

    def check(self, scheme: str, name: str, value: Any) -> Any:
        if value is None:
            return self.default
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is int and isinstance(value, str) and value.isdigit():
            value = int(value)
        if self.kind is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool) != (self.kind is bool):
            raise SchemeError(f"{scheme}: option {name} must be a {self.kind.__name__}")
        if self.choices and value not in self.choices:
            listed = ", ".join(str(c) for c in self.choices)
            raise SchemeError(f"{scheme}: {name}={value} is not supported (supported: {listed})")
        number = value if isinstance(value, (int, float)) else None
        if number is not None and (
            (self.low is not None and number < self.low)
            or (self.high is not None and number > self.high)
        ):
            raise SchemeError(f"{scheme}: {name}={value} is out of range [{self.low}, {self.high}]")
        return value


EMBEDDING_HELP = "how the input embedding and output head are stored"
METHOD = Option(
    str, "gptq", ("gptq", "rtn"), help="gptq: error-compensating rounding; rtn: to nearest"
)
ACT_ORDER = Option(
    bool, False, help="gptq: columns by decreasing input energy (worse on gemma3:270m)"
)
CALIB = Option(int, 2048, low=0, high=65536, help="calibration tokens (0: none)")


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    summary: str
    options: dict[str, Option] = field(default_factory=dict)
    warning: str = ""

    def check_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            listed = ", ".join(self.options) or "none"
            raise SchemeError(
                f"{self.name}: unknown option {unknown[0]!r} (supported options: {listed})"
            )
        return {
            name: opt.check(self.name, name, given.get(name)) for name, opt in self.options.items()
        }


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "int8",
            "int8 weight-only, symmetric per output channel",
            {
                "embedding": Option(str, "int8", ("int8", "keep"), help=EMBEDDING_HELP),
            },
        ),
        Scheme(
            "int4",
            "int4 weight-only, asymmetric group-wise, GPTQ on calibration text",
            {
                "group_size": Option(int, 32, (32, 64, 128, 256)),
                "embedding": Option(str, "int4", ("int4", "int8", "keep"), help=EMBEDDING_HELP),
                "method": METHOD,
                "act_order": ACT_ORDER,
                "calibration_tokens": CALIB,
            },
        ),
        Scheme(
            "int2",
            "int2 weight-only, asymmetric group-wise",
            {
                "group_size": Option(int, 32, (16, 32, 64, 128, 256)),
                "embedding": Option(str, "int4", ("int4", "int8", "keep"), help=EMBEDDING_HELP),
                "method": METHOD,
                "act_order": ACT_ORDER,
                "calibration_tokens": CALIB,
            },
            warning="int2 loses most of a small model's quality; use it for experiments only",
        ),
        Scheme(
            "nf4",
            "NormalFloat4 block-wise (bitsandbytes kernel on CUDA)",
            {
                "group_size": Option(int, 64, (32, 64, 128, 256)),
                "embedding": Option(str, "nf4", ("nf4", "int8", "keep"), help=EMBEDDING_HELP),
            },
        ),
        Scheme(
            "lowrank",
            "truncated SVD of the decoder's linear layers to a rank or a retained-energy ratio",
            {
                "rank": Option(int, 0, low=0, high=1 << 20, help="0: use energy"),
                "energy": Option(float, 0.9, low=0.01, high=1.0),
                "embedding": Option(str, "int8", ("int8", "keep"), help=EMBEDDING_HELP),
            },
        ),
        Scheme(
            "prune",
            "pruning (magnitude or Wanda; unstructured or 2:4), stored dense or int8",
            {
                "method": Option(str, "wanda", ("magnitude", "wanda")),
                "pattern": Option(str, "unstructured", ("unstructured", "2:4")),
                "sparsity": Option(float, 0.5, low=0.0, high=0.95),
                "bits": Option(int, 8, (8, 32), help="storage of the pruned weights"),
                "embedding": Option(str, "int8", ("int8", "keep"), help=EMBEDDING_HELP),
                "calibration_tokens": CALIB,
            },
        ),
        Scheme(
            "mixed",
            "per-layer int8 / int4 chosen by sensitivity on calibration text for a target size",
            {
                "target": Option(float, 0.18, low=0.08, high=0.6, help="size vs float32"),
                "group_size": Option(int, 32, (32, 64, 128, 256)),
                "method": METHOD,
                "act_order": ACT_ORDER,
                "calibration_tokens": CALIB,
            },
        ),
    )
}

# Ollama's quantization names -> the nearest scheme and options.
OLLAMA_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "q8_0": ("int8", {}),
    "q4_0": ("int4", {"group_size": 32}),
    "q4_1": ("int4", {"group_size": 32}),
    "q4_k_s": ("int4", {"group_size": 32}),
    "q4_k_m": ("mixed", {"target": 0.22}),
}


def supported() -> str:
    return ", ".join([*SCHEMES, *(a.replace("_k_", "_K_") for a in OLLAMA_ALIASES)])


def resolve(name: str, options: dict[str, Any] | None = None) -> tuple[Scheme, dict[str, Any]]:
    """The scheme and its checked options for a scheme name or Ollama quantization name."""
    if not isinstance(name, str) or not name:
        raise SchemeError(f"quantize must be a scheme name (supported: {supported()})")
    key = name.strip().lower()
    preset: dict[str, Any] = {}
    if key in OLLAMA_ALIASES:
        key, preset = OLLAMA_ALIASES[key]
    scheme = SCHEMES.get(key)
    if scheme is None:
        raise SchemeError(f"unknown quantization scheme {name[:40]!r} (supported: {supported()})")
    if options is not None and not isinstance(options, dict):
        raise SchemeError("compression options must be an object")
    return scheme, scheme.check_options({**preset, **(options or {})})


GROUPED = ("int4", "int2", "nf4", "mixed")


def check_shapes(
    scheme: Scheme, options: dict[str, Any], shapes: dict[str, tuple[int, ...]], embedding: str
) -> None:
    """Refuses options the model's weight shapes cannot take (``shapes``: weight name ->
    shape of every 2-D weight; ``embedding``: the input embedding's weight name)."""
    matrices = {n: s for n, s in shapes.items() if len(s) == 2}
    linears = {n: s for n, s in matrices.items() if n != embedding}
    grouped = dict(linears)
    if options.get("embedding", "int4") in GROUPED and embedding in matrices:
        grouped[embedding] = matrices[embedding]
    if scheme.name in GROUPED:
        group = int(options["group_size"])
        bad = sorted(n for n, s in grouped.items() if s[1] % group)
        if bad:
            choices = scheme.options["group_size"].choices
            fitting = [g for g in choices if all(s[1] % g == 0 for s in grouped.values())]
            raise SchemeError(
                f"{scheme.name}: group_size {group} does not divide the input width "
                f"{grouped[bad[0]][1]} of {bad[0].removesuffix('.weight')}; group sizes that "
                f"fit this model: {', '.join(map(str, fitting)) or 'none'}"
            )
    if scheme.name == "prune" and options["pattern"] == "2:4":
        bad = sorted(n for n, s in linears.items() if s[1] % 4)
        if bad:
            raise SchemeError(f"prune: 2:4 needs input widths divisible by 4 ({bad[0]})")
    if scheme.name == "lowrank" and options["rank"] and linears:
        limit = min(s[0] * s[1] // (s[0] + s[1]) for s in linears.values())
        if options["rank"] >= limit:
            raise SchemeError(
                f"lowrank: rank {options['rank']} saves no space on this model; "
                f"ranks 1..{limit - 1} do (or give energy instead)"
            )

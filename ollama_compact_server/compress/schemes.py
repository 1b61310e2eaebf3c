"""The compression schemes, one handler each: its options (validated, with typed errors that
list what is supported), its checks against a model's weight shapes, whether it calibrates,
its plan of how each module is stored, the step that stores one, and the facts the engine
serves its models by. Nothing outside this module compares scheme names.

Importing it loads no torch (the routes and the CLI check requests with it): the steps that
work on tensors get them from :mod:`.pipeline` and import the algorithms they call lazily."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .format import GROUPED_KINDS, ModuleSpec

if TYPE_CHECKING:
    import torch

    from .pipeline import Run, Target

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
    """A scheme's handler. This base stores every decoder linear as module kind ``kind``
    (compress/format.py) and the input embedding as its ``embedding`` option says; it checks
    group sizes when the scheme has a ``group_size`` option and calibrates when it has a
    ``calibration_tokens`` one. Subclasses override the steps that differ.

    ``options`` as the steps receive them are :meth:`check_options`' result (all present)."""

    name: str
    summary: str
    options: dict[str, Option] = field(default_factory=dict)
    warning: str = ""
    kind: str = ""  # the module kind of the decoder's linears
    # Runtime facts. runtime_format: the weight format the memory planner sizes its models
    # as (engine/planner.py WEIGHT_FORMATS; None: the serving dtype's). integer: our integer
    # CPU kernels serve its modules (auto on the CPU then serves it with float32
    # activations, engine/device.py). source: compress and merge may start from its models
    # (loaded dequantized), which they refuse for a compressed copy of a registry model.
    runtime_format: str | None = None
    integer: bool = False
    source: bool = False
    per_layer: bool = False  # the plan differs per module and the manifest records it

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

    # ---------------------------------------------------------------- before any weight loads

    def embedding_kind(self, options: dict[str, Any]) -> str:
        """The module kind of the input embedding (and a head tied to it), or "keep"."""
        return str(options.get("embedding", "keep"))

    def check_shapes(
        self, options: dict[str, Any], shapes: dict[str, tuple[int, ...]], embedding: str
    ) -> None:
        """Refuses options the model's weight shapes cannot take (``shapes``: weight name ->
        shape of every 2-D weight; ``embedding``: the input embedding's weight name)."""
        if "group_size" not in self.options:
            return
        matrices = _matrices(shapes)
        grouped = _linears(shapes, embedding)
        if self.embedding_kind(options) in GROUPED_KINDS and embedding in matrices:
            grouped[embedding] = matrices[embedding]
        group = int(options["group_size"])
        bad = sorted(n for n, s in grouped.items() if s[1] % group)
        if bad:
            choices = self.options["group_size"].choices
            fitting = [g for g in choices if all(s[1] % g == 0 for s in grouped.values())]
            raise SchemeError(
                f"{self.name}: group_size {group} does not divide the input width "
                f"{grouped[bad[0]][1]} of {bad[0].removesuffix('.weight')}; group sizes that "
                f"fit this model: {', '.join(map(str, fitting)) or 'none'}"
            )

    def calibrates(self, options: dict[str, Any]) -> bool:
        """Whether it measures the parent on calibration text (input energy per channel)."""
        return "calibration_tokens" in self.options

    def gptq(self, options: dict[str, Any]) -> bool:
        """Whether its int4 / int2 modules are rounded by GPTQ (calibration Hessians)."""
        return options.get("method") == "gptq"

    # ---------------------------------------------------------------- the compression itself

    def plan(self, run: Run, targets: list[Target]) -> dict[str, str]:
        """The module kind each target (the decoder's linears, the embedding unless kept,
        an untied head) is stored as."""
        embedding = self.embedding_kind(run.options)
        return {t.name: embedding if t.embedding else self.kind for t in targets}

    def encode(
        self, run: Run, target: Target, kind: str
    ) -> tuple[dict[str, torch.Tensor], ModuleSpec]:
        """The stored tensors (without the bias) and the spec of one planned target."""
        return run.store(target, kind)


class LowRank(Scheme):
    """Truncated SVD of the linears; a factor pair that would not save space stays dense."""

    __slots__ = ()

    def check_shapes(
        self, options: dict[str, Any], shapes: dict[str, tuple[int, ...]], embedding: str
    ) -> None:
        linears = _linears(shapes, embedding)
        if options["rank"] and linears:
            limit = min(s[0] * s[1] // (s[0] + s[1]) for s in linears.values())
            if options["rank"] >= limit:
                raise SchemeError(
                    f"lowrank: rank {options['rank']} saves no space on this model; "
                    f"ranks 1..{limit - 1} do (or give energy instead)"
                )

    def encode(
        self, run: Run, target: Target, kind: str
    ) -> tuple[dict[str, torch.Tensor], ModuleSpec]:
        if kind != "lowrank":
            return run.store(target, kind)
        from . import lowrank

        n, k = target.weight.shape
        rank = run.options["rank"] or None
        tensors = lowrank.factor(target.weight, rank, None if rank else run.options["energy"])
        spec = ModuleSpec("lowrank", k, n, rank=tensors["u"].shape[1])
        if not lowrank.saves_space(n, k, spec.rank):  # energy asked for too much: keep it
            return run.store(target, "dense")
        return tensors, spec


class Prune(Scheme):
    """Zeroes weights of the linears (Wanda weighs them by calibration input energy) and
    stores them int8 or dense; the embedding is stored as its option says, unpruned."""

    __slots__ = ()

    def check_shapes(
        self, options: dict[str, Any], shapes: dict[str, tuple[int, ...]], embedding: str
    ) -> None:
        if options["pattern"] == "2:4":
            bad = sorted(n for n, s in _linears(shapes, embedding).items() if s[1] % 4)
            if bad:
                raise SchemeError(f"prune: 2:4 needs input widths divisible by 4 ({bad[0]})")

    def calibrates(self, options: dict[str, Any]) -> bool:
        return options["method"] == "wanda"

    def plan(self, run: Run, targets: list[Target]) -> dict[str, str]:
        embedding = self.embedding_kind(run.options)
        linear = "int8" if run.options["bits"] == 8 else "dense"
        return {t.name: embedding if t.embedding else linear for t in targets}

    def encode(
        self, run: Run, target: Target, kind: str
    ) -> tuple[dict[str, torch.Tensor], ModuleSpec]:
        if target.embedding:
            return run.store(target, kind)
        from .prune import prune

        options = run.options
        pruned = prune(
            target.weight,
            options["method"],
            options["pattern"],
            options["sparsity"],
            run.energy.get(target.energy_from),
        )
        return run.store(dataclasses.replace(target, weight=pruned), kind)


class Mixed(Scheme):
    """int4 everywhere, int8 where it pays most for a size target: the embedding and head
    included (grouped shape checks for them too), chosen on Fisher or energy measurements."""

    __slots__ = ()

    def embedding_kind(self, options: dict[str, Any]) -> str:
        return "int4"  # where the plan starts; it may raise the table to int8

    def plan(self, run: Run, targets: list[Target]) -> dict[str, str]:
        from .mixed import mixed_plan

        fisher = run.fisher(targets)
        kinds = mixed_plan(
            targets, run.group, run.options["target"], run.energy_of, run.progress, fisher
        )
        del fisher
        return kinds


def _matrices(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {n: s for n, s in shapes.items() if len(s) == 2}


def _linears(shapes: dict[str, tuple[int, ...]], embedding: str) -> dict[str, tuple[int, ...]]:
    return {n: s for n, s in _matrices(shapes).items() if n != embedding}


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "int8",
            "int8 weight-only, symmetric per output channel",
            {
                "embedding": Option(str, "int8", ("int8", "keep"), help=EMBEDDING_HELP),
            },
            kind="int8",
            runtime_format="int8",
            integer=True,
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
            kind="int4",
            runtime_format="int4",
            integer=True,
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
            kind="int2",
            runtime_format="int4",  # int2 codes run on the int4 kernel (quant.int2_as_int4)
            integer=True,
        ),
        Scheme(
            "nf4",
            "NormalFloat4 block-wise (bitsandbytes kernel on CUDA)",
            {
                "group_size": Option(int, 64, (32, 64, 128, 256)),
                "embedding": Option(str, "nf4", ("nf4", "int8", "keep"), help=EMBEDDING_HELP),
            },
            kind="nf4",
            runtime_format="nf4",
        ),
        LowRank(
            "lowrank",
            "truncated SVD of the decoder's linear layers to a rank or a retained-energy ratio",
            {
                "rank": Option(int, 0, low=0, high=1 << 20, help="0: use energy"),
                "energy": Option(float, 0.9, low=0.01, high=1.0),
                "embedding": Option(str, "int8", ("int8", "keep"), help=EMBEDDING_HELP),
            },
            kind="lowrank",
        ),
        Prune(
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
        Mixed(
            "mixed",
            "per-layer int8 / int4 chosen by sensitivity on calibration text for a target size",
            {
                "target": Option(float, 0.18, low=0.08, high=0.6, help="size vs float32"),
                "group_size": Option(int, 32, (32, 64, 128, 256)),
                "method": METHOD,
                "act_order": ACT_ORDER,
                "calibration_tokens": CALIB,
            },
            runtime_format="int8",  # int8 and int4 modules, sized as int8
            integer=True,
            per_layer=True,
        ),
    )
}

# Schemes that models get from an import, never from compress (resolve() refuses them).
GGUF = Scheme(
    "gguf",
    "an imported GGUF file's int8 and int4 modules (modeling/gguf.py)",
    runtime_format="int8",  # sized as int8
    integer=True,
    source=True,  # no float parent in the registry: its expansion is the float model
)
IMPORTED: dict[str, Scheme] = {GGUF.name: GGUF}


def recorded(name: str | None) -> Scheme | None:
    """The handler of a scheme a manifest records (``quantization.scheme``); None for a
    float model (no scheme) or a name this version does not know."""
    if not name:
        return None
    return SCHEMES.get(name) or IMPORTED.get(name)


def loads_as_float(name: str) -> bool:
    """Whether a model recorded with scheme ``name`` may be where compress and merge start
    (loaded dequantized): an imported GGUF file, yes; a compressed copy of a registry
    model (compress its parent instead) or a scheme this version does not know, no."""
    handler = recorded(name)
    return handler is not None and handler.source


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

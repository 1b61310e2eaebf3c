"""Runs a scheme's handler over a float model: picks the modules (decoder linears, input
embedding, output head), has the scheme check their shapes, calibrates where it wants that,
stores each module as the scheme plans, and returns the compressed tensors with their
per-module specs. What differs between schemes lives in their handlers (compress/schemes.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import quant
from .calibration import calibration_windows, fisher_diagonal, input_energy
from .format import GROUPED_KINDS, ModuleSpec
from .gptq import gptq
from .schemes import Scheme, SchemeError

log = logging.getLogger(__name__)
# GPTQ for a tied table against the head's inputs: worse on gemma3:270m (ppl 24.3 vs 23.6),
# since the lookup then suffers; kept as a switch for experiments.
GPTQ_TABLE = False

Progress = Callable[[str, int | None, int | None], None]


@dataclass(slots=True)
class Target:
    name: str
    weight: torch.Tensor  # [N, K] (an embedding table is [vocab, hidden])
    bias: torch.Tensor | None
    embedding: bool = False
    energy_from: str = ""  # module whose input energy weighs this weight's errors


@dataclass(slots=True)
class Compressed:
    tensors: dict[str, torch.Tensor]
    specs: dict[str, ModuleSpec]
    shapes: dict[str, list[int]]
    warnings: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # a per-layer plan: module -> kind

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


def language_modules(model: nn.Module) -> set[int]:
    """The modules of a vision-language model's language model (ids); every module of a
    text model. A vision tower and its projector stay as they are: the encoder's weights
    are a small share of the model and its features are sensitive to rounding."""
    inner = getattr(model, "model", None)
    language = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    if getattr(getattr(model, "config", None), "vision_config", None) is None:
        return {id(m) for m in model.modules()}
    if not isinstance(language, nn.Module):
        raise SchemeError("this vision model's language model cannot be told from its tower")
    return {id(m) for m in language.modules()}


def find_targets(model: nn.Module) -> tuple[list[Target], str | None]:
    """The compressible modules (of the language model only, for a vision-language
    model), and the head's name when it is tied to the embedding."""
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    names = {id(m): n for n, m in model.named_modules()}
    language = language_modules(model)
    head_name = names.get(id(head)) if head is not None else None
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    targets = [
        Target(
            names[id(embed)],
            embed.weight,
            None,
            embedding=True,
            energy_from=head_name if tied and head_name else "",
        )
    ]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and id(module) in language:
            targets.append(Target(name, module.weight, module.bias, energy_from=name))
    if head is not None and not tied and head_name:
        targets.append(Target(head_name, head.weight, head.bias, energy_from=head_name))
    return targets, (head_name if tied else None)


GPTQ_LEVELS = {"int4": 16, "int2": 4}  # the module kinds GPTQ rounds, and their code count
PACKS = {"int4": quant.pack_int4, "int2": quant.pack_int2}


def _quantize(kind: str, target: Target, group: int, energy: torch.Tensor | None) -> dict:
    w = target.weight
    if kind == "int8":
        return quant.quantize_int8(w)
    if kind == "int4":
        return quant.quantize_int4(w, group, energy)
    if kind == "int2":
        return quant.quantize_int2(w, group, energy)
    if kind == "nf4":
        return quant.quantize_nf4(w, group)
    if kind == "dense":
        return {"weight": w.detach().clone()}
    raise SchemeError(f"unknown storage kind {kind}")


@dataclass(slots=True)
class Run:
    """One compression under way: what a scheme's steps share (the parent model, the
    checked options, the calibration measurements) and the step that stores one matrix."""

    model: nn.Module
    tokenizer: Any
    options: dict[str, Any]
    progress: Progress
    group: int  # the options' group size (32 where the scheme has none)
    energy: dict[str, torch.Tensor] = field(default_factory=dict)  # input energy per linear
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # GPTQ's, used up

    @property
    def tokens(self) -> int:
        """Calibration tokens to measure (0: none, or nothing to tokenize them with)."""
        if self.tokenizer is None:
            return 0
        return int(self.options.get("calibration_tokens", 0))

    def calibrate(self, gptq_for: frozenset[str]) -> None:
        """Records every linear's input energy (and X^T X of the ``gptq_for`` modules)."""
        windows = calibration_windows(self.tokenizer, self.tokens)
        self.energy = input_energy(
            self.model,
            windows,
            lambda i, n: self.progress("calibrating", i, n),
            self.hessians,
            gptq_for,
        )

    def energy_of(self, t: Target) -> torch.Tensor | None:
        """The input energy that weighs ``t``'s errors, normalised to mean 1 (None: unknown)."""
        found = self.energy.get(t.energy_from)
        return found / found.mean().clamp(min=1e-12) if found is not None else None

    def fisher(self, targets: list[Target]) -> dict[str, torch.Tensor]:
        """The Fisher diagonal of each target's weight ({} without calibration)."""
        if not self.tokens:
            return {}
        return fisher_diagonal(
            self.model,
            calibration_windows(self.tokenizer, self.tokens),
            {t.name: t.weight for t in targets},
            lambda i, n: self.progress("measuring sensitivity", i, n),
        )

    def store(self, t: Target, kind: str) -> tuple[dict[str, torch.Tensor], ModuleSpec]:
        """``t``'s weight stored as module ``kind``: GPTQ where a Hessian was recorded for
        it, else rounding weighted by its input energy."""
        n, k = t.weight.shape
        spec = ModuleSpec(kind, k, n, embedding=t.embedding)
        if kind in GROUPED_KINDS:
            spec.group_size = self.group
        source = t.energy_from if t.embedding else t.name
        if self.hessians and source in self.hessians and kind in GPTQ_LEVELS:
            codes, scale, zero = gptq(
                t.weight,
                self.hessians.pop(source),
                GPTQ_LEVELS[kind],
                self.group,
                act_order=bool(self.options.get("act_order")),
            )
            return PACKS[kind](codes, scale, zero), spec
        return _quantize(kind, t, self.group, self.energy_of(t)), spec


def compress_model(
    model: nn.Module,
    tokenizer: Any,
    scheme: Scheme,
    options: dict[str, Any],
    progress: Progress = _noop,
) -> Compressed:
    """Compresses ``model`` with ``scheme`` (``options``: as resolve() checked them): the
    scheme's shape checks, calibration where it wants it, its plan, then each module
    stored as planned; what no target covers (norms, biases of kept modules) is copied."""
    targets, tied_head = find_targets(model)
    embedding = scheme.embedding_kind(options)
    emb_target = targets[0]
    linears = targets[1:]
    if embedding == "keep":
        targets = linears
    shapes = {f"{t.name}.weight": tuple(t.weight.shape) for t in [emb_target, *linears]}
    scheme.check_shapes(options, shapes, f"{emb_target.name}.weight")

    run = Run(model, tokenizer, options, progress, int(options.get("group_size", 32)))
    gptq_names = {t.name for t in linears}
    if GPTQ_TABLE and emb_target.energy_from:
        gptq_names.add(emb_target.energy_from)  # the tied head's inputs
    if scheme.calibrates(options) and run.tokens:
        run.calibrate(frozenset(gptq_names) if scheme.gptq(options) else frozenset())

    out = Compressed({}, {}, {})
    for t in [emb_target, *linears]:
        out.shapes[t.name + ".weight"] = list(t.weight.shape)
    kinds = scheme.plan(run, targets)
    if scheme.per_layer:
        out.choices = dict(kinds)
    total = len(targets)
    for i, t in enumerate(targets):
        progress(f"compressing {t.name}", i, total)
        tensors, spec = scheme.encode(run, t, kinds[t.name])
        if t.bias is not None:
            tensors["bias"] = t.bias.detach().clone()
        for key, value in tensors.items():
            out.tensors[f"{t.name}.{key}"] = value.contiguous()
        out.specs[t.name] = spec
    if tied_head and embedding != "keep":
        n, k = emb_target.weight.shape
        out.specs[tied_head] = ModuleSpec("tied", k, n, source=emb_target.name)
    done = {f"{t.name}.{p}" for t in targets for p in ("weight", "bias")}
    if tied_head and embedding != "keep":
        done.add(f"{tied_head}.weight")
    for key, value in model.state_dict().items():
        if key not in done and not (tied_head and key == f"{tied_head}.weight"):
            out.tensors[key] = value.detach().clone().contiguous()
    if scheme.warning:
        out.warnings.append(scheme.warning)
    progress("compressed", total, total)
    return out

"""Runs a scheme over a float model: picks the modules (decoder linears, input embedding,
output head), checks the options fit their shapes, calibrates where the scheme wants it, and
returns the compressed tensors with their per-module specs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import lowrank, prune, quant
from .calibration import calibration_windows, fisher_diagonal, input_energy
from .format import ModuleSpec
from .gptq import gptq
from .schemes import Scheme, SchemeError, check_shapes

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
    choices: dict[str, str] = field(default_factory=dict)  # mixed: module -> kind

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


def find_targets(model: nn.Module) -> tuple[list[Target], str | None]:
    """The compressible modules, and the head's name when it is tied to the embedding."""
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    names = {id(m): n for n, m in model.named_modules()}
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
        if isinstance(module, nn.Linear) and module is not head:
            targets.append(Target(name, module.weight, module.bias, energy_from=name))
    if head is not None and not tied and head_name:
        targets.append(Target(head_name, head.weight, head.bias, energy_from=head_name))
    return targets, (head_name if tied else None)


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


def _error(
    target: Target,
    tensors: dict,
    kind: str,
    energy: torch.Tensor | None,
    fisher: torch.Tensor | None = None,
) -> float:
    """How much quantizing ``target`` costs: with the Fisher diagonal, the estimated rise of
    the loss, sum F * dW^2; without it, the layer's activation-weighted output error,
    sum_j E[x_j^2] ||dW_j||^2."""
    n = target.weight.shape[0]
    deq = quant.dequantize_int8(tensors) if kind == "int8" else quant.dequantize_int4(tensors, n)
    diff = (deq - target.weight.detach().float()) ** 2  # [N, K]
    if fisher is not None:
        return float((diff * fisher).sum())
    col = diff.sum(dim=0)
    return float((col * energy).sum() if energy is not None else col.sum())


def compress_model(
    model: nn.Module,
    tokenizer: Any,
    scheme: Scheme,
    options: dict[str, Any],
    progress: Progress = _noop,
) -> Compressed:
    targets, tied_head = find_targets(model)
    embedding = options.get("embedding", "int4" if scheme.name == "mixed" else "keep")
    group = int(options.get("group_size", 32))
    emb_target = targets[0]
    linears = targets[1:]
    if embedding == "keep":
        targets = linears
    group_kinds = {"int4", "int2", "nf4"}
    shapes = {f"{t.name}.weight": tuple(t.weight.shape) for t in [emb_target, *linears]}
    check_shapes(scheme, options, shapes, f"{emb_target.name}.weight")

    energy: dict[str, torch.Tensor] = {}
    tokens = int(options.get("calibration_tokens", 0))
    wants = scheme.name in ("int4", "int2", "mixed") or (
        scheme.name == "prune" and options["method"] == "wanda"
    )
    hessians: dict[str, torch.Tensor] = {}
    gptq_names = {t.name for t in linears}
    if GPTQ_TABLE and emb_target.energy_from:
        gptq_names.add(emb_target.energy_from)  # the tied head's inputs
    gptq_for = frozenset(gptq_names) if options.get("method") == "gptq" else None
    if wants and tokens and tokenizer is not None:
        windows = calibration_windows(tokenizer, tokens)
        energy = input_energy(
            model,
            windows,
            lambda i, n: progress("calibrating", i, n),
            hessians,
            gptq_for or frozenset(),
        )

    def energy_of(t: Target) -> torch.Tensor | None:
        found = energy.get(t.energy_from)
        return found / found.mean().clamp(min=1e-12) if found is not None else None

    out = Compressed({}, {}, {})
    for t in [emb_target, *linears]:
        out.shapes[t.name + ".weight"] = list(t.weight.shape)
    kinds: dict[str, str] = {}
    if scheme.name == "mixed":
        fisher: dict[str, torch.Tensor] = {}
        if tokens and tokenizer is not None:
            fisher = fisher_diagonal(
                model,
                calibration_windows(tokenizer, tokens),
                {t.name: t.weight for t in targets},
                lambda i, n: progress("measuring sensitivity", i, n),
            )
        kinds = _mixed_plan(targets, group, options["target"], energy_of, progress, fisher)
        del fisher
        out.choices = dict(kinds)
    total = len(targets)
    for i, t in enumerate(targets):
        progress(f"compressing {t.name}", i, total)
        n, k = t.weight.shape
        spec = ModuleSpec("dense", k, n, embedding=t.embedding)
        if scheme.name == "lowrank" and not t.embedding:
            rank = options["rank"] or None
            tensors = lowrank.factor(t.weight, rank, None if rank else options["energy"])
            spec.kind, spec.rank = "lowrank", tensors["u"].shape[1]
            if not lowrank.saves_space(n, k, spec.rank):  # energy asked for too much: keep it
                tensors, spec.kind, spec.rank = {"weight": t.weight.detach().clone()}, "dense", 0
        elif scheme.name == "prune" and not t.embedding:
            pruned = prune.prune(
                t.weight,
                options["method"],
                options["pattern"],
                options["sparsity"],
                energy.get(t.energy_from),
            )
            spec.kind = "int8" if options["bits"] == 8 else "dense"
            tensors = _quantize(spec.kind, Target(t.name, pruned, t.bias), group, None)
        else:
            if scheme.name == "mixed":
                spec.kind = kinds[t.name]
            elif t.embedding:
                spec.kind = embedding
            else:
                spec.kind = scheme.name
            if spec.kind in group_kinds:
                spec.group_size = group
            source = t.energy_from if t.embedding else t.name
            if hessians and source in hessians and spec.kind in ("int4", "int2"):
                levels = 16 if spec.kind == "int4" else 4
                codes, scale, zero = gptq(
                    t.weight,
                    hessians.pop(source),
                    levels,
                    group,
                    act_order=bool(options.get("act_order")),
                )
                pack = quant.pack_int4 if spec.kind == "int4" else quant.pack_int2
                tensors = pack(codes, scale, zero)
            else:
                tensors = _quantize(spec.kind, t, group, energy_of(t))
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


def _mixed_plan(
    targets: list[Target],
    group: int,
    ratio: float,
    energy_of: Callable[[Target], torch.Tensor | None],
    progress: Progress,
    fisher: dict[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """int4 everywhere, then int8 for the modules whose error falls most per extra byte,
    while the whole model stays under ``ratio`` of its float32 size. The error is the
    Fisher-weighted one where ``fisher`` has the module, else the per-layer output error
    (gemma3:270m at 18% of float32 with GPTQ: perplexity +8.7% when the Fisher diagonal
    chose, +12.4% when the per-layer output error did; docs/PERFORMANCE.md)."""
    fisher = fisher or {}
    budget = ratio * 32 * sum(t.weight.numel() for t in targets)
    kinds = {t.name: "int4" for t in targets}
    gains = []
    for i, t in enumerate(targets):
        progress(f"measuring sensitivity of {t.name}", i, len(targets))
        e = energy_of(t)
        f = fisher.get(t.name)
        err4 = _error(t, quant.quantize_int4(t.weight, group, e), "int4", e, f)
        err8 = _error(t, quant.quantize_int8(t.weight), "int8", e, f)
        n, k = t.weight.shape
        cost4 = ModuleSpec("int4", k, n, group_size=group).bits_per_weight() * n * k
        cost8 = ModuleSpec("int8", k, n).bits_per_weight() * n * k
        gains.append(((err4 - err8) / (cost8 - cost4), cost8 - cost4, t.name))
    used = sum(
        ModuleSpec("int4", t.weight.shape[1], t.weight.shape[0], group_size=group).bits_per_weight()
        * t.weight.numel()
        for t in targets
    )
    for _, extra, name in sorted(gains, reverse=True):
        if used + extra <= budget:
            kinds[name] = "int8"
            used += extra
    return kinds

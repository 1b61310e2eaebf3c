"""Compression scheme handlers: every scheme resolve() accepts (and every imported one) has
a handler with all its facts and steps, the runtime facts the engine reads are the ones it
used to keep in tables, and no module outside compress/schemes.py compares scheme names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ollama_compact_server.compress.format import KINDS
from ollama_compact_server.compress.pipeline import Run, Target
from ollama_compact_server.compress.schemes import (
    IMPORTED,
    OLLAMA_ALIASES,
    SCHEMES,
    Scheme,
    SchemeError,
    loads_as_float,
    recorded,
    resolve,
)
from ollama_compact_server.engine.device import integer_scheme
from ollama_compact_server.engine.planner import WEIGHT_FORMATS

PACKAGE = Path(__file__).resolve().parent.parent / "ollama_compact_server"
HANDLERS = {**SCHEMES, **IMPORTED}
ACCEPTED = [*SCHEMES, *OLLAMA_ALIASES, "Q4_K_M", " INT8 "]

# What engine/provider.py's COMPRESSED_FORMATS and engine/device.py's INTEGER_SCHEMES said,
# and which compressed models jobs/compressing.py and jobs/merge.py took as a source.
RUNTIME = {  # scheme: (planner weight format or None for the serving dtype, integer, source)
    "int8": ("int8", True, False),
    "int4": ("int4", True, False),
    "int2": ("int4", True, False),
    "nf4": ("nf4", False, False),
    "mixed": ("int8", True, False),
    "gguf": ("int8", True, True),
    "lowrank": (None, False, False),
    "prune": (None, False, False),
}


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_accepted_name_has_a_handler_with_all_facts(name: str) -> None:
    scheme, options = resolve(name)
    assert isinstance(scheme, Scheme) and recorded(scheme.name) is scheme
    assert scheme.summary and set(options) == set(scheme.options)
    assert scheme.runtime_format is None or scheme.runtime_format in WEIGHT_FORMATS
    assert isinstance(scheme.integer, bool) and isinstance(scheme.source, bool)
    assert scheme.embedding_kind(options) in (*KINDS, "keep")
    assert isinstance(scheme.calibrates(options), bool)
    assert isinstance(scheme.gptq(options), bool)


def test_the_handler_table_covers_every_scheme_a_manifest_may_record() -> None:
    assert set(HANDLERS) == set(RUNTIME)
    assert all(name == handler.name for name, handler in HANDLERS.items())
    assert not set(SCHEMES) & set(IMPORTED)
    with pytest.raises(SchemeError, match="unknown quantization scheme"):
        resolve("gguf")  # made by import, never by compress
    assert recorded(None) is None and recorded("") is None and recorded("int9") is None


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_runtime_facts_are_the_ones_the_engine_used_to_tabulate(name: str) -> None:
    handler = HANDLERS[name]
    fmt, integer, source = RUNTIME[name]
    assert (handler.runtime_format, handler.integer, handler.source) == (fmt, integer, source)
    assert integer_scheme(name) is integer
    assert loads_as_float(name) is source


def test_an_unknown_recorded_scheme_is_float_sized_and_no_source() -> None:
    assert not integer_scheme("int9") and not integer_scheme(None)
    assert not loads_as_float("int9") and not loads_as_float("")


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_plans_and_encodes_known_kinds(name: str) -> None:
    """The handler's offline steps on bare tensors (no model, no calibration text): every
    target gets a stored kind, and encoding it gives that kind (or dense, where a low-rank
    pair would not save space) with the target's shape."""
    scheme, options = resolve(name)
    gen = torch.Generator().manual_seed(0)
    targets = [
        Target("embed", torch.randn(96, 64, generator=gen), None, embedding=True),
        Target("proj", torch.randn(48, 64, generator=gen), None, energy_from="proj"),
    ]
    if scheme.embedding_kind(options) == "keep":
        targets = targets[1:]
    run = Run(torch.nn.Module(), None, options, _noop, int(options.get("group_size", 32)))
    kinds = scheme.plan(run, targets)
    assert set(kinds) == {t.name for t in targets}
    assert set(kinds.values()) <= set(KINDS) - {"tied"}
    for t in targets:
        tensors, spec = scheme.encode(run, t, kinds[t.name])
        assert tensors and spec.kind in (kinds[t.name], "dense")
        assert (spec.out_features, spec.in_features) == tuple(t.weight.shape)
        assert spec.embedding == t.embedding


def test_shape_checks_belong_to_the_handlers() -> None:
    shapes = {"embed.weight": (100, 48), "proj.weight": (30, 48), "norm.weight": (48,)}
    int4, options = resolve("int4", {"group_size": 32})
    with pytest.raises(SchemeError, match="group sizes that fit this model: none"):
        int4.check_shapes(options, shapes, "embed.weight")
    lowrank, options = resolve("lowrank", {"rank": 30})
    with pytest.raises(SchemeError, match=r"ranks 1\.\.17 do"):
        lowrank.check_shapes(options, shapes, "embed.weight")
    prune, options = resolve("prune", {"pattern": "2:4"})
    prune.check_shapes(options, shapes, "embed.weight")
    with pytest.raises(SchemeError, match="2:4 needs input widths divisible by 4"):
        prune.check_shapes(options, {"proj.weight": (8, 10)}, "embed.weight")
    int8, options = resolve("int8")
    int8.check_shapes(options, shapes, "embed.weight")  # no group: any width


# ------------------------------------------------------------------ no name comparisons


SCHEME_ONLY = set(HANDLERS) - set(KINDS)  # names that are schemes and never module kinds


def _literal_strings(node: ast.AST) -> list[str] | None:
    """The strings of a string constant or a literal tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
        if len(values) == len(node.elts) and all(isinstance(v, str) for v in values):
            return [str(v) for v in values]
    return None


def _is_table(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return isinstance(name, str) and name.isupper() and len(name) > 1


def scheme_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines that branch on a scheme name: a comparison of something named *scheme* with
    a scheme's name (alone or in a literal collection) or with an UPPER_CASE table; or a
    literal table (collection or dict keys) of names that holds a scheme that is no module
    kind. (A URL's scheme compared with "https" is no compression scheme.)"""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            about_scheme = any("scheme" in ast.unparse(o).lower() for o in operands)
            against = any(
                set(_literal_strings(o) or ()) & set(HANDLERS) or _is_table(o) for o in operands
            )
            if about_scheme and against:
                lines.append(node.lineno)
        keys = None
        if isinstance(node, ast.Dict):
            keys = _literal_strings(ast.Tuple(elts=[k for k in node.keys if k is not None]))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            keys = _literal_strings(node)
        if keys and len(keys) > 1 and set(keys) & SCHEME_ONLY:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_detector_sees_the_old_ladders_and_tables() -> None:
    old = """
if scheme.name == "mixed": pass
wants = scheme.name in ("int4", "int2", "mixed")
if record.config.quantization.scheme != "gguf": pass
if scheme_of(record) in INTEGER_SCHEMES: pass
INTEGER_SCHEMES = frozenset({"int8", "int4", "int2", "mixed", "gguf"})
COMPRESSED_FORMATS = {"int8": "int8", "mixed": "int8"}
"""
    assert scheme_name_comparisons(ast.parse(old)) == [2, 3, 4, 5, 6, 7]
    fine = """
if spec.kind == "int4": pass
KERNELS = {"int8": 1, "int4": 2, "lowrank": 3}
if scheme_name.lower() != scheme.name: pass
if location.scheme not in ("http", "https"): pass
"""
    assert scheme_name_comparisons(ast.parse(fine)) == []


def test_no_module_outside_the_handler_table_compares_scheme_names() -> None:
    table = PACKAGE / "compress" / "schemes.py"
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == table:
            continue
        for line in scheme_name_comparisons(ast.parse(path.read_text())):
            problems.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert not problems, problems

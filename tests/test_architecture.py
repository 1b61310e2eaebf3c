"""Structure: imports point down the layers of ARCHITECTURE.md, the registry never imports
torch, and nothing in the package loads pickle, runs remote code or relies on assert."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ollama_compact_server"

# Every top-level module of the package and what of the package it may import, bottom up
# (ARCHITECTURE.md's layers). A new module needs a row here; "__init__" is the package's own
# __init__ (its version string).
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "units": set(),  # sizes and durations: the bottom
    "logs": set(),
    "threads": set(),
    "modelfile": set(),
    "protocol": set(),  # uvicorn's h11 protocol with read deadlines
    "registry": {"units"},  # the filesystem: no torch, nothing above it
    "settings": {"registry", "units"},
    "compress": {"units"},
    "modeling": {"compress", "registry", "units", "threads"},
    "engine": {"compress", "modeling", "registry", "settings", "threads", "units"},  # schemes
    "chat": {"engine", "logs", "modeling", "registry", "units"},
    "training": {"chat", "modeling"},  # data formats and the loop of fine-tuning
    "jobs": {"compress", "modeling", "registry", "training", "units", "threads"},  # workflows
    "api": {
        "__init__",
        "chat",
        "compress",
        "engine",
        "jobs",
        "logs",
        "modelfile",  # the web page's Modelfile box (api/ui.py)
        "registry",
        "settings",
        "threads",
        "training",
        "units",
    },  # never modeling: model work goes through jobs
    "app": {
        "__init__",
        "api",
        "chat",
        "engine",
        "jobs",
        "logs",
        "modeling",
        "registry",
        "settings",
        "threads",
        "units",
    },
    "evaluation": {"app", "engine", "logs", "modeling", "registry", "settings", "units"},
    "server": {"api", "app", "engine", "logs", "protocol", "registry", "settings", "units"},
    "commands": {
        "engine",
        "evaluation",
        "jobs",
        "logs",
        "modelfile",
        "registry",
        "server",
        "settings",
        "training",
        "units",
    },
    "replica": {"api", "app", "settings", "threads"},  # a daemon replica over ASGI; no ray
    "ingress": {"api", "registry"},  # the Ray ingress's model ids, body cap, merges; no ray
    "serve_ray": {
        "api",
        "app",
        "ingress",
        "registry",
        "replica",
        "server",
        "settings",
    },  # Ray Serve's deployments; ray lazily
    "run_images": {"commands", "settings"},  # `run` with --image / --images-dir
    "cli": {"__init__", "commands", "run_images", "serve_ray", "server", "settings", "units"},
    "__main__": {"cli"},
}


def internal_imports(path: Path) -> set[str]:
    """Top-level package modules that a module imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE).with_suffix("")
    depth = len(rel.parts) - 1
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > depth:
                    continue
                base = list(rel.parts[: depth - up])
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # "from . import x" at the top level
                    target = [a.name for a in node.names]
                    found.update(target)
                    continue
                found.add(target[0])
            elif node.module and node.module.startswith("ollama_compact_server."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ollama_compact_server."):
                    found.add(alias.name.split(".")[1])
    return found


def top_level_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        found = {"__init__" if t == "__version__" else t for t in internal_imports(path)}
        graph.setdefault(layer, set()).update(found - {layer})
    return graph


def test_every_top_level_module_has_a_row() -> None:
    graph = top_level_graph()
    assert set(graph) <= set(ALLOWED), sorted(set(graph) - set(ALLOWED))
    assert set(ALLOWED) <= set(graph), sorted(set(ALLOWED) - set(graph))  # no stale rows


def test_imports_point_down() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        found = {"__init__" if t == "__version__" else t for t in internal_imports(path)}
        for target in sorted(found - ALLOWED[layer] - {layer}):
            problems.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not problems, problems


def test_no_import_cycles_between_top_level_modules() -> None:
    """Lazy imports inside functions count too: a cycle is a cycle, whenever it closes."""
    graph = top_level_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


DIALECTS = ("ollama", "openai", "anthropic")


def test_dialects_never_import_each_other() -> None:
    """What two dialects share lives in chat/ or in api/'s shared modules."""
    problems = []
    for dialect in DIALECTS:
        folder = PACKAGE / "api" / dialect
        assert folder.is_dir(), folder
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2:
                    target = (node.module or "").split(".")[0]
                    names = [a.name for a in node.names] if not node.module else [target]
                    for other in set(names) & (set(DIALECTS) - {dialect}):
                        problems.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not problems, problems


def test_registry_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import ollama_compact_server.registry.store, ollama_compact_server.registry.importers\n"
        "import ollama_compact_server.registry.dropin, ollama_compact_server.settings\n"
        "import ollama_compact_server.app, ollama_compact_server.cli\n"
        "import ollama_compact_server.commands\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_no_unsafe_loading_or_asserts_in_the_package() -> None:
    banned = re.compile(
        r"torch\.load\(|pickle\.loads?\(|import pickle|trust_remote_code\s*=\s*True"
    )
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not banned.search(text), path
        tree = ast.parse(text)
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.relative_to(PACKAGE)} uses assert at lines {asserts}"

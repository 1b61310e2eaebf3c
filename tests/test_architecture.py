"""Structure: imports point down the layers of ARCHITECTURE.md, the registry never imports
torch, and nothing in the package loads pickle, runs remote code or relies on assert."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ollama_compact_server"

# layer -> package-internal layers it must not import
FORBIDDEN = {
    "registry": {
        "api",
        "chat",
        "engine",
        "modeling",
        "compress",
        "app",
        "cli",
        "server",
        "commands",
    },
    "compress": {"api", "chat", "engine", "app", "cli", "server", "commands"},
    "modeling": {"api", "chat", "engine", "app", "cli", "server", "commands"},
    "engine": {"api", "chat", "app", "cli", "server", "commands"},
    "chat": {"api", "app", "cli", "server", "commands"},
    "api": {"app", "cli", "server", "commands", "modeling"},
    "jobs": {"api", "app", "cli", "server", "commands"},
    "settings": {
        "api",
        "chat",
        "engine",
        "modeling",
        "compress",
        "app",
        "cli",
        "server",
        "commands",
    },
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


def test_imports_point_down() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for target in internal_imports(path) & FORBIDDEN.get(layer, set()):
            problems.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not problems, problems


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

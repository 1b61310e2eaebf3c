"""Model names: Ollama's grammar, display form, and no way out of the registry root."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from ollama_compact_server.registry.errors import InvalidName
from ollama_compact_server.registry.names import ModelName
from ollama_compact_server.registry.store import Registry


@pytest.mark.parametrize(
    ("text", "display"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:8b", "llama3:8b"),
        ("gemma3:270m", "gemma3:270m"),
        ("library/llama3:8b", "llama3:8b"),
        ("user/model:tag", "user/model:tag"),
        ("registry.ollama.ai/library/x:y", "x:y"),
        ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo:Q4_K_M"),
        ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t"),
        ("a_b.c-d:v1.0", "a_b.c-d:v1.0"),
        ("  padded  ", "padded:latest"),
    ],
)
def test_valid_names(text: str, display: str) -> None:
    name = ModelName.parse(text)
    assert name.display() == display
    assert ModelName.parse(name.display()) == name


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "../x",
        "../../etc/passwd",
        "/abs",
        "a/../../b",
        "..",
        ".",
        "-h",
        "-hh/nn/mm:tt",
        "host/name:space/model:tag",
        "a//b",
        "a/b/c/d",
        "m:",
        ":tag",
        "m:.",
        "m:..",
        "x" * 81,
        "m:" + "t" * 81,
        "ns.dot/model",
        "mod\x00el",
        "mo del",
        "mödel",
        "m@sha256:" + "0" * 64,
        "a\\b",
        "%2e%2e%2fx",
        "x\n:latest",  # `$` matched before a final newline
        "ns\n/model",
        "host.example\n/ns/model",
    ],
)
def test_invalid_names(text: str) -> None:
    with pytest.raises(InvalidName, match="invalid model name"):
        ModelName.parse(text)


def test_non_strings_are_invalid() -> None:
    for value in (None, 5, ["x"], {"a": 1}):
        with pytest.raises(InvalidName):
            ModelName.parse(value)


def test_case_insensitive_identity() -> None:
    assert ModelName.parse("Llama3:8B").key() == ModelName.parse("llama3:8b").key()


def test_any_accepted_name_stays_inside_the_root(tmp_path: Path) -> None:
    """Property test over random strings built from the dangerous alphabet."""
    registry = Registry(tmp_path / "root")
    alphabet = string.ascii_letters + string.digits + "._-:/@\\%\x00 " + "..//"
    rng = random.Random(1234)
    root = registry.manifest_dir.resolve()
    accepted = 0
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        try:
            name = ModelName.parse(text)
        except InvalidName:
            continue
        accepted += 1
        path = registry._manifest_path(name).resolve()
        assert path.is_relative_to(root), text
        assert registry.blobs.dir.resolve().parent == registry.root.resolve()
    assert accepted > 100


def test_every_name_pattern_refuses_a_final_newline() -> None:
    """`re.match` with `$` accepts "x\\n"; each validator matches the whole string."""
    from ollama_compact_server.api.guard import origin_allowed
    from ollama_compact_server.registry.errors import InvalidModel
    from ollama_compact_server.registry.manifest import check_filename
    from ollama_compact_server.settings import parse_size

    with pytest.raises(InvalidModel):
        check_filename("model.safetensors\n")
    assert check_filename("model.safetensors") == "model.safetensors"
    assert not origin_allowed("http://localhost:3000\n", [])
    assert origin_allowed("http://localhost:3000", [])
    with pytest.raises(ValueError):
        parse_size("4GiB\nx")

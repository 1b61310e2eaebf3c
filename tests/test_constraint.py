"""Structured output's grammar: JSON as the schema says, with llama.cpp's whitespace."""

from __future__ import annotations

import llguidance
import pytest

from ollama_compact_server.engine.constraint import GuidedTokenizer, grammar_for
from ollama_compact_server.engine.types import EngineError
from tests.factory import make_tokenizer

SCHEMA = '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}'


def accepts(grammar: str, text: str) -> bool:
    """Whether the grammar lets a model write ``text`` (and stop there)."""
    tokenizer = make_tokenizer()
    guided = GuidedTokenizer(tokenizer, len(tokenizer)).get()
    matcher = llguidance.LLMatcher(guided, grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.mark.parametrize("wrap", [None, ("<tool_call>", "</tool_call>")])
def test_whitespace_is_bounded_as_llama_cpp_bounds_it(wrap) -> None:
    """A small model free to write any run of whitespace inside the object can spend its
    whole budget on newlines: one space, or one or two line breaks and an indent."""
    grammar = grammar_for(SCHEMA, wrap)
    before, after = wrap or ("", "")
    for text in ('{"name": "kiwi"}', '{\n  "name": "kiwi"\n}', '{"name":"kiwi"}'):
        assert accepts(grammar, before + text + after), text
    for text in ('{\n\n\n"name": "kiwi"}', '{"name":   "kiwi"}'):
        assert not accepts(grammar, before + text + after), text


def test_a_schema_that_is_not_json_is_refused() -> None:
    with pytest.raises(EngineError, match="not valid JSON"):
        grammar_for("{nope")

"""Special-token text typed by a user stays text.

A tokenizer parses the text of its special tokens (``<start_of_turn>``, ``<eos>``,
``<|im_end|>``) into the control tokens themselves. The chat template's own markup must be
parsed that way, but text inside a message must not: a user who types ``<end_of_turn>`` would
otherwise end their turn and write the model's. Before rendering, every special-token text in
the content the client sent (messages, tool definitions and results, the system prompt) is
wrapped in a per-render random mark; after rendering, the prompt is encoded piece by piece:
template text with special parsing, the wrapped pieces as plain text. A request without such
text renders and encodes exactly as before. (A ``raw`` prompt, where the client writes the
template itself, is encoded with special parsing, as Ollama does.)
"""

from __future__ import annotations

import re
import secrets
import weakref
from typing import Any

_PATTERNS: weakref.WeakKeyDictionary[Any, re.Pattern[str] | None] = weakref.WeakKeyDictionary()


def special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the text of any special token of ``tokenizer`` (None if it has none),
    built as a trie so that thousands of tokens (Gemma's ``<unusedN>``) stay fast; cached on
    each tokenizer."""
    if tokenizer in _PATTERNS:
        return _PATTERNS[tokenizer]
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    texts.discard("")
    pattern = re.compile(_trie(sorted(texts))) if texts else None
    _PATTERNS[tokenizer] = pattern
    return pattern


def _trie(words: list[str]) -> str:
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    # the recursion is as deep as the longest special token is long: a few dozen at most
    return build(root)


def new_mark() -> str:
    """A mark no client can type in advance (random per render)."""
    return f"\ue000{secrets.token_hex(8)}\ue001"


def defuse(value: Any, pattern: re.Pattern[str] | None, mark: str) -> Any:
    """``value`` (strings, lists, dicts, nested) with every special-token text wrapped in
    ``mark``; the same objects where there is none."""
    if pattern is None:
        return value
    if isinstance(value, str):
        if pattern.search(value) is None:
            return value
        return pattern.sub(lambda m: f"{mark}{m.group(0)}{mark}", value)
    if isinstance(value, list):
        items = [defuse(v, pattern, mark) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        pairs = {k: defuse(v, pattern, mark) for k, v in value.items()}
        return value if all(pairs[k] is value[k] for k in value) else pairs
    return value


def encode_marked(tokenizer: Any, text: str, mark: str) -> list[int]:
    """Token ids of a rendered prompt: the template's text with special-token parsing, the
    pieces between marks as plain text."""
    parts = text.split(mark)
    if len(parts) == 1:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    for index, part in enumerate(parts):
        if not part:
            continue
        literal = index % 2 == 1
        encoded = tokenizer(part, add_special_tokens=False, split_special_tokens=literal)
        ids += encoded["input_ids"]
    return ids


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of text that is all the client's (embedding input, a prompt without a
    template): special-token text stays text; BOS / EOS still added where the tokenizer
    adds them."""
    return list(
        tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)[
            "input_ids"
        ]
    )


# ------------------------------------------------------------------ prompts too long to read

_LONGEST: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
PIECE = 1 << 18  # characters tokenized at a time when counting a long text


def longest_token(tokenizer: Any) -> int:
    """The most characters one token stands for (its vocabulary entry, whose symbols each
    stand for at least a character; added tokens such as ``<start_of_turn>`` included): a
    text of n characters is at least n / this many tokens. Cached per tokenizer."""
    if tokenizer in _LONGEST:
        return _LONGEST[tokenizer]
    longest = max((len(k) for k in tokenizer.get_vocab()), default=64) or 64
    _LONGEST[tokenizer] = longest
    return longest


def check_fits(tokenizer: Any, text: str, context: int) -> None:
    """Raises ValueError (with the reason) for a text that cannot fit ``context`` tokens,
    without tokenizing all of a huge one: longer than twice context x the longest token
    is refused from its length alone (twice: a normalizer may compose two characters into
    one symbol); past 8 characters a token, it is counted in pieces cut at
    whitespace, stopping once it is surely over (each cut adds at most a couple of tokens
    to the count)."""
    if not context:
        return
    if len(text) > 2 * context * longest_token(tokenizer):  # 2: normalizers that compose
        raise ValueError(f"the prompt is longer than the model's context of {context} tokens")
    if len(text) <= context * 8:
        return  # tokenized once, whole, by the caller
    count, start, cuts = 0, 0, 0
    while start < len(text):
        stop = min(start + PIECE, len(text))
        if stop < len(text):
            space = text.rfind(" ", start + PIECE // 2, stop)
            stop = space if space > start else stop
        count += len(tokenizer(text[start:stop], add_special_tokens=False)["input_ids"])
        cuts += 1
        if count > context + 2 * cuts:
            raise ValueError(f"the prompt is longer than the model's context of {context} tokens")
        start = stop

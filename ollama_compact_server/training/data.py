"""Training data: the file formats people bring from peft, LlamaFactory and the OpenAI
fine-tuning API, read and checked in full before any weights load, then turned into token
ids with the base model's own chat template and a label mask (which tokens the loss sees).

Formats (``auto`` picks one from the file name and the first record's fields):

- ``chat``: JSONL of ``{"messages": [{"role", "content"}, ...]}``; the loss sees the
  assistant turns only.
- ``completion``: JSONL of ``{"prompt", "completion"}``; the loss sees the completion.
- ``alpaca``: ``{"instruction", "input", "output"}`` (optional ``system`` and ``history``
  of [question, answer] pairs), LlamaFactory's format, as JSONL or one JSON array.
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` (``human``/``gpt``/
  ``system``), optional ``system``.
- ``text``: plain text (a ``.txt`` file, or JSONL of ``{"text"}``): every token is
  learnt, in windows of ``max_length`` tokens.
- ``csv``: a header row naming the columns: ``text``; or ``prompt`` and ``completion``;
  or ``instruction`` (with optional ``input``) and ``output``; other names are mapped
  onto those with ``columns`` (e.g. ``{"prompt": "question", "completion": "answer"}``).

A bad file raises one :class:`DataError` naming the file, the line (or record) and the
field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "chat", "completion", "alpaca", "sharegpt", "text", "csv")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
CSV_FIELDS = ("text", "prompt", "completion", "instruction", "input", "output")
MAX_FILE_BYTES = 4 << 30  # a training file is read into memory
MAX_RECORDS = 10_000_000
IGNORE = -100  # the label of a token the loss does not see (the transformers convention)


class DataError(ValueError):
    """A training file that cannot be used: the message names where and why."""


@dataclass(slots=True)
class Example:
    """One training example, before tokenization: chat messages (the loss on assistant
    turns), a prompt and completion (the loss on the completion) or plain text (all)."""

    where: str  # "train.jsonl line 12", for errors found later (while tokenizing)
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass(slots=True)
class Dataset:
    examples: list[Example]
    format: str
    name: str
    sha256: str
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ reading


def read_dataset(
    path: Path, fmt: str = "auto", columns: dict[str, str] | None = None, name: str | None = None
) -> Dataset:
    """Reads and checks a whole training file; raises DataError (naming the line and the
    field) for the first problem."""
    label = name or path.name
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (one of: {', '.join(FORMATS)})")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{label} is {size} bytes, over the {MAX_FILE_BYTES >> 30} GiB limit")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {label}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{label} line {line}: not UTF-8 text") from None
    if not content.strip():
        raise DataError(f"{label} is empty")
    suffix = path.suffix.lower() if name is None else Path(name).suffix.lower()
    if fmt == "auto":
        fmt = _guess(content, suffix)
    if fmt == "text" and suffix not in (".jsonl", ".json"):
        examples = [Example(where=f"{label}", text=content)]
    elif fmt == "csv":
        examples = list(_csv_examples(content, label, columns or {}))
    else:
        examples = [_example(rec, where, fmt) for where, rec in _records(content, label)]
    if not examples:
        raise DataError(f"{label} holds no examples")
    return Dataset(examples=examples, format=fmt, name=label, sha256=digest)


def _guess(content: str, suffix: str) -> str:
    if suffix == ".csv":
        return "csv"
    if suffix not in (".jsonl", ".json", ".ndjson"):
        return "text"
    first: Any = None
    for _, record in _records(content, "data", limit=1):
        first = record
    if not isinstance(first, dict):
        raise DataError("the first record is not a JSON object")
    keys = set(first)
    for fmt, needs in (
        ("chat", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if needs <= keys:
            return fmt
    raise DataError(
        "cannot tell the data format from the first record's fields "
        f"({', '.join(sorted(keys)[:10]) or 'none'}): expected 'messages' (chat), "
        "'conversations' (sharegpt), 'instruction' and 'output' (alpaca), 'prompt' and "
        "'completion', or 'text'; or name the format"
    )


def _records(content: str, label: str, limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSONL file, or of a JSON file holding one array of records."""
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{label} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{label}: expected a JSON array of records")
        for index, record in enumerate(records[:limit] if limit else records):
            yield f"{label} record {index + 1}", record
        return
    count = 0
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{label} line {number}: invalid JSON ({exc.msg})") from None
        yield f"{label} line {number}", record
        count += 1
        if limit and count >= limit:
            return
        if count > MAX_RECORDS:
            raise DataError(f"{label} has over {MAX_RECORDS} records")


def _text(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise DataError(f"{where}: field '{key}' is {kind}")
    return value


def _example(record: Any, where: str, fmt: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "chat":
        return Example(where, messages=_messages(record, where))
    if fmt == "completion":
        prompt = _text(record, "prompt", where)
        completion = _text(record, "completion", where)
        if not completion:
            raise DataError(f"{where}: field 'completion' is empty")
        return Example(where, prompt=prompt, completion=completion)
    if fmt == "alpaca":
        return Example(where, messages=_alpaca(record, where))
    if fmt == "sharegpt":
        return Example(where, messages=_sharegpt(record, where))
    if fmt == "text":
        text = _text(record, "text", where)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty")
        return Example(where, text=text)
    raise DataError(f"{where}: the {fmt} format has no JSON records")


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        here = f"{where}: 'messages'[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{here} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{here}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise DataError(f"{here}: 'content' parts must be text parts")
                texts.append(_text(part, "text", here))
            content = "".join(texts)
        if not isinstance(content, str):
            raise DataError(f"{here}: 'content' must be text")
        out.append({"role": role, "content": content})
    return _checked_turns(out, where)


def _checked_turns(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    for index, message in enumerate(messages):
        if message["role"] == "system" and index > 0:
            raise DataError(f"{where}: a system message may only come first (message {index})")
    return messages


def _alpaca(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    output = _text(record, "output", where)
    if not output:
        raise DataError(f"{where}: field 'output' is empty")
    messages: list[dict[str, str]] = []
    system = _text(record, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] pairs")
    for index, pair in enumerate(history):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)
        ):
            raise DataError(f"{where}: 'history'[{index}] must be a [question, answer] pair")
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def _sharegpt(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    messages: list[dict[str, str]] = []
    system = _text(record, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        here = f"{where}: 'conversations'[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{here} is not an object")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"{here}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {speaker!r}"
            )
        messages.append({"role": role, "content": _text(turn, "value", here)})
    return _checked_turns(messages, where)


def _csv_examples(content: str, label: str, columns: dict[str, str]) -> Iterator[Example]:
    for key in columns:
        if key not in CSV_FIELDS:
            raise DataError(f"columns: {key!r} is not one of {', '.join(CSV_FIELDS)}")
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = reader.fieldnames or []
    mapping = {key: columns.get(key, key) for key in CSV_FIELDS}
    present = {key for key, column in mapping.items() if column in header}
    for column in columns.values():
        if column not in header:
            raise DataError(f"{label}: no column {column!r} (the header has: {', '.join(header)})")
    if {"prompt", "completion"} <= present:
        kind = "completion"
    elif {"instruction", "output"} <= present:
        kind = "alpaca"
    elif "text" in present:
        kind = "text"
    else:
        raise DataError(
            f"{label}: the header ({', '.join(header) or 'empty'}) names no usable columns: "
            "'text', or 'prompt' and 'completion', or 'instruction' and 'output' "
            "(map other names with columns, e.g. prompt=question)"
        )
    try:
        for row in reader:
            where = f"{label} line {reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the header has")
            record = {key: row.get(mapping[key]) for key in present}
            yield _example(record, where, kind)
    except csv.Error as exc:
        raise DataError(f"{label} line {reader.line_num}: {exc}") from None


# ------------------------------------------------------------------------------ tokens


@dataclass(slots=True)
class Tokenized:
    ids: list[int]
    labels: list[int]  # IGNORE where the loss does not look

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


Render = Callable[[list[dict[str, str]], bool], str]


class Encoder:
    """Turns examples into token ids and labels with the base model's tokenizer and chat
    template (the same template serving renders, so the adapter learns what it will see)."""

    def __init__(
        self,
        tokenizer: Any,
        render: Render | None,
        max_length: int,
        system: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.render = render
        self.max_length = max_length
        self.system = system  # the model's default system prompt, added as serving does
        self.truncated = 0

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def encode(self, example: Example) -> list[Tokenized]:
        if example.text is not None:
            return self._text(example.text)
        if example.messages is not None:
            pieces = self._chat(example)
        else:
            pieces = [
                (self._bos() + self._ids(example.prompt or ""), False),
                (self._ids(example.completion or "") + self._eos(), True),
            ]
        ids: list[int] = []
        labels: list[int] = []
        for piece, trained in pieces:
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return [Tokenized(ids, labels)]

    def _text(self, text: str) -> list[Tokenized]:
        ids = self._bos() + self._ids(text) + self._eos()
        out = []
        for start in range(0, len(ids), self.max_length):
            window = ids[start : start + self.max_length]
            if len(window) >= 2:
                out.append(Tokenized(window, list(window)))
        return out

    def _chat(self, example: Example) -> list[tuple[list[int], bool]]:
        """The rendered conversation in pieces: each assistant turn (as the template closes
        it) is learnt, what comes before it is context. The template is rendered once per
        assistant turn; each render must extend the previous one."""
        messages = list(example.messages or [])
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        render = self.render or _plain
        pieces: list[tuple[list[int], bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = render(messages[:index], True)
            turn = render(messages[: index + 1], False)
            if not prefix.startswith(done) or not turn.startswith(prefix):
                raise DataError(
                    f"{example.where}: the chat template does not render this conversation "
                    "turn by turn (an earlier turn changes when a later one is added)"
                )
            pieces.append((self._ids(prefix[len(done) :]), False))
            learnt = self._ids(turn[len(prefix) :])
            if self.render is None:
                learnt += self._eos()
            pieces.append((learnt, True))
            done = turn
        return pieces


def _plain(messages: list[dict[str, str]], generation: bool) -> str:
    """For a model without a chat template: role-labelled lines, as serving renders them
    (chat.templates.plain_chat) when it asks for the answer."""
    from ..chat.templates import plain_chat

    if generation:
        return plain_chat(messages)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def template_renderer(template: str, tokenizer: Any) -> Render:
    """The model's Jinja chat template as a renderer (what serving renders)."""
    from ..chat.templates import render

    def run(messages: list[dict[str, str]], generation: bool) -> str:
        return render(
            template,
            messages=messages,
            add_generation_prompt=generation,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )

    return run


def split(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): a seeded shuffle, ``fraction`` held out (at least one item when
    the fraction is above zero and there are at least two items)."""
    import random

    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # noqa: S311 (a reproducible split, not a secret)
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = sorted(order[:count])
    kept = sorted(order[count:])
    return [items[i] for i in kept], [items[i] for i in held]

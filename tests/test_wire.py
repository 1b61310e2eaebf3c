"""Each dialect's wire model converts itself to the one dialect-free ChatRequest: a table
per dialect of request bodies and the fields they must produce (ARCHITECTURE habit 5)."""

from __future__ import annotations

from typing import Any

import pytest

from ollama_compact_server.api.anthropic.wire import MessagesRequest
from ollama_compact_server.api.errors import APIError
from ollama_compact_server.api.ollama.wire import ChatRequestWire, GenerateRequestWire
from ollama_compact_server.api.openai.responses_wire import ResponsesRequest
from ollama_compact_server.api.openai.wire import ChatCompletionRequest, CompletionRequest
from ollama_compact_server.api.wire import parse
from ollama_compact_server.chat.turn import ChatRequest, Message, ToolChoice
from ollama_compact_server.engine.types import ANY_JSON_OBJECT

USER = [{"role": "user", "content": "hi"}]
FN = {"name": "f", "parameters": {"type": "object"}}


def convert(model: Any, body: dict[str, Any]) -> ChatRequest:
    wire = parse(model, body)
    return wire.to_chat_request([]) if model is ResponsesRequest else wire.to_chat_request()


def roles(request: ChatRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


CASES: list[tuple[Any, dict[str, Any], dict[str, Any]]] = [
    # Ollama
    (
        ChatRequestWire,
        {"model": "m", "messages": USER, "options": {"temperature": 0}, "think": "high"},
        {"options": {"temperature": 0}, "think": True, "messages": [("user", "hi")]},
    ),
    (ChatRequestWire, {"name": "m", "model": "", "messages": USER}, {"model": "m"}),
    (
        ChatRequestWire,
        {"model": "m", "messages": USER, "format": "json"},
        {"json_schema": ANY_JSON_OBJECT},
    ),
    (
        ChatRequestWire,
        {"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 3},
        {"logprobs": 3},
    ),
    (ChatRequestWire, {"model": "m", "messages": USER, "keep_alive": "1m"}, {"keep_alive": 60.0}),
    (
        GenerateRequestWire,
        {"model": "m", "prompt": "p", "system": "s", "context": [1, 2]},
        {"prompts": ["p"], "system": "s", "context": [1, 2], "raw": False},
    ),
    (
        GenerateRequestWire,
        {"model": "m", "prompt": "p", "raw": True, "think": True},
        {"raw": True, "think": None},
    ),
    # OpenAI chat completions
    (
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be"}]}, *USER],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "stop": "x",
            "seed": 3,
            "top_k": 9,
            "repetition_penalty": 1.0,
        },
        {
            "messages": [("system", "be"), ("user", "hi")],
            "options": {
                "num_predict": 7,
                "temperature": 0.5,
                "stop": ["x"],
                "seed": 3,
                "top_k": 9,
                "repeat_penalty": 1.0,
            },
        },
    ),
    (
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": USER,
            "tools": [{"type": "function", "function": FN}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        {"tool_choice": ToolChoice.REQUIRED, "tool_name": "f"},
    ),
    (
        ChatCompletionRequest,
        {"model": "m", "messages": USER, "tool_choice": "none"},
        {"tool_choice": ToolChoice.NONE},
    ),
    (
        ChatCompletionRequest,
        {"model": "m", "messages": USER, "reasoning_effort": "none"},
        {"think": False, "think_strict": False},
    ),
    (ChatCompletionRequest, {"model": "m", "messages": USER, "logprobs": True}, {"logprobs": 0}),
    (
        ChatCompletionRequest,
        {"model": "m", "messages": USER, "n": 3, "logit_bias": {"5": -100}},
        {"n": 3, "logit_bias": {5: -100.0}},
    ),
    (
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
        },
        {"json_schema": '{"type": "object"}'},
    ),
    # OpenAI legacy completions
    (
        CompletionRequest,
        {"model": "m", "prompt": "p"},
        {"prompts": ["p"], "raw": True, "options": {"num_predict": 16}},
    ),
    (
        CompletionRequest,
        {"model": "m", "prompt": ["a", "b"], "max_tokens": 0, "echo": True, "logprobs": 1},
        {"echo": True, "logprobs": 1},
    ),
    # OpenAI Responses
    (
        ResponsesRequest,
        {"model": "m", "input": "hi", "instructions": "be", "max_output_tokens": 9},
        {"messages": [("system", "be"), ("user", "hi")], "options": {"num_predict": 9}},
    ),
    (
        ResponsesRequest,
        {
            "model": "m",
            "input": [
                *USER,
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            ],
        },
        {"messages": [("user", "hi"), ("assistant", ""), ("tool", "ok")]},
    ),
    (
        ResponsesRequest,
        {"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}},
        {"json_schema": ANY_JSON_OBJECT},
    ),
    (
        ResponsesRequest,
        {"model": "m", "input": "x", "reasoning": {"effort": "minimal"}},
        {"think": False},
    ),
    # Anthropic
    (
        MessagesRequest,
        {
            "model": "m",
            "max_tokens": 8,
            "system": "be",
            "messages": USER,
            "top_k": 4,
            "stop_sequences": ["##"],
        },
        {
            "messages": [("system", "be"), ("user", "hi")],
            "options": {"num_predict": 8, "top_k": 4, "stop": ["##"]},
        },
    ),
    (
        MessagesRequest,
        {
            "model": "m",
            "max_tokens": 8,
            "messages": USER,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        },
        {"tool_choice": ToolChoice.REQUIRED, "tool_name": None},
    ),
    (
        MessagesRequest,
        {"model": "m", "max_tokens": 8, "messages": USER, "thinking": {"type": "disabled"}},
        {"think": False},
    ),
]


@pytest.mark.parametrize(("model", "body", "expected"), CASES)
def test_wire_to_chat_request(model: Any, body: dict[str, Any], expected: dict[str, Any]) -> None:
    request = convert(model, body)
    for key, value in expected.items():
        got = roles(request) if key == "messages" else getattr(request, key)
        assert got == value, (key, got)


def test_history_items_keep_their_calls_and_ids() -> None:
    anthropic = convert(
        MessagesRequest,
        {
            "model": "m",
            "max_tokens": 8,
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": ""},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
                },
            ],
        },
    )
    assistant, tool = anthropic.messages[1], anthropic.messages[2]
    assert assistant.thinking == "hm" and assistant.tool_calls[0].id == "t1"
    assert (tool.role, tool.tool_call_id, tool.name, tool.content) == ("tool", "t1", "f", "ok")
    template = assistant.for_template()
    assert template["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    responses = convert(
        ResponsesRequest,
        {
            "model": "m",
            "input": [
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            ],
        },
    )
    assert responses.messages == [
        Message("assistant", thinking="hm", tool_calls=responses.messages[0].tool_calls)
    ]
    assert responses.messages[0].tool_calls[0].id == "c1"


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (ChatRequestWire, {"model": "m", "messages": USER, "think": "loud"}),
        (ChatRequestWire, {"messages": USER}),
        (GenerateRequestWire, {"model": "m", "prompt": "p", "raw": True, "system": "s"}),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "top_logprobs": 2}),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "logit_bias": {"x": 1}}),
        (CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": 0}),
        (CompletionRequest, {"model": "m", "prompt": []}),
        (ResponsesRequest, {"model": "m", "input": [{"type": "item_reference", "id": "x"}]}),
        (
            MessagesRequest,
            {"model": "m", "max_tokens": 8, "messages": USER, "tool_choice": {"type": "tool"}},
        ),
    ],
)
def test_wire_refusals_are_400(model: Any, body: dict[str, Any]) -> None:
    with pytest.raises(APIError) as info:
        convert(model, body)
    assert info.value.status == 400

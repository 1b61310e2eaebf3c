"""The Modelfile parser behind `ollama-compact create -f`: every command Ollama's CLI
reads, triple-quoted blocks, comments, and clear errors naming the bad line."""

from __future__ import annotations

import pytest

from ollama_compact_server.modelfile import ModelfileError, parse_modelfile

FULL = '''# a comment, then a blank line

FROM hf.co/org/model:main
ADAPTER ./lora
adapter ./second
PARAMETER temperature 0.7
PARAMETER num_ctx 4096
PARAMETER stop "<|im_end|>"
PARAMETER stop <end_of_turn>
PARAMETER penalize_newline false
TEMPLATE """{% for m in messages %}
  <{{ m['role'] }}>{{ m['content'] }}
{% endfor %}"""
SYSTEM You are "helpful".
MESSAGE user """What is
two plus two?"""
MESSAGE assistant Four.
LICENSE """MIT License
Copyright"""
LICENSE Apache-2.0
'''


def test_every_command() -> None:
    result = parse_modelfile(FULL)
    assert result.from_ == "hf.co/org/model:main"
    assert result.adapters == ["./lora", "./second"]
    assert result.parameters == {
        "temperature": 0.7,
        "num_ctx": 4096,
        "stop": ["<|im_end|>", "<end_of_turn>"],
        "penalize_newline": False,
    }
    assert result.template == (
        "{% for m in messages %}\n  <{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    )
    assert result.system == 'You are "helpful".'
    assert result.messages == [
        {"role": "user", "content": "What is\ntwo plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    assert result.licenses == ["MIT License\nCopyright", "Apache-2.0"]


def test_quoting_forms() -> None:
    result = parse_modelfile(
        'FROM "tiny"\nSYSTEM """one line"""\nTEMPLATE "a\\nb"\nPARAMETER stop "\\"q\\""\n'
    )
    assert result.from_ == "tiny" and result.system == "one line"
    assert result.template == "a\nb" and result.parameters["stop"] == ['"q"']
    block = parse_modelfile('FROM tiny\nSYSTEM """\nfirst\n\n# not a comment\n"""\n')
    assert block.system == "\nfirst\n\n# not a comment\n"


def test_commands_are_case_insensitive_and_defaults_empty() -> None:
    result = parse_modelfile("from tiny\nparameter Top_K 20\n")
    assert result.from_ == "tiny" and result.parameters == {"top_k": 20}
    assert result.template is None and result.system is None
    assert result.messages == [] and result.licenses == [] and result.adapters == []


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("", "no FROM"),
        ("# only a comment\n", "no FROM"),
        ("SYSTEM hi\n", "no FROM"),
        ("FROM tiny\nFOO bar\n", "line 2: unknown command 'FOO'"),
        ("FROM tiny\nPARAMETER temperature\n", "line 2: PARAMETER needs a name and a value"),
        ("FROM tiny\nMESSAGE wizard hi\n", "line 2: MESSAGE needs a role"),
        ("FROM tiny\nMESSAGE user\n", "line 2: MESSAGE needs a role"),
        ('FROM tiny\nTEMPLATE """never closed\nstill open\n', "line 2: unterminated"),
        ('FROM tiny\n"""stray\n', "line 2: cannot parse"),
        ("FROM tiny\n123 x\n", "line 2: cannot parse"),
    ],
)
def test_bad_modelfiles_name_the_problem(source: str, says: str) -> None:
    with pytest.raises(ModelfileError, match=says):
        parse_modelfile(source)

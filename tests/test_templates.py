"""The chat template sandbox: a hard deadline (loops without output included), size caps
checked before big strings or numbers are built, no dunder access, compile errors and
runaway recursion as TemplateError; ordinary chat templates still render."""

from __future__ import annotations

import time

import pytest

from ollama_compact_server.chat import templates
from ollama_compact_server.chat.templates import TemplateError, check, render

CHAT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.first and m['role'] == 'system' %}<sys>{{ m['content'] | trim }}</sys>"
    "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}"
    "{% if loop.last %}!{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}]


def test_a_normal_chat_template_renders() -> None:
    text = render(
        CHAT, messages=MESSAGES, bos_token="<s>", add_generation_prompt=True, tools=[{"a": 1}]
    )
    assert text == '<s><sys>be brief</sys><user>hi</user>![{"a": 1}]<assistant>'
    loop = "{% for x in items if x %}{{ loop.index }}/{{ loop.length }} {% endfor %}"
    assert render(loop, items=iter(["a", "", "b"])) == "1/2 2/2 "
    recursive = (
        "{% for n in tree recursive %}{{ n.name }}"
        "{% if n.children %}({{ loop(n.children) }}){% endif %}{% endfor %}"
    )
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}]
    assert render(recursive, tree=tree) == "a(b)"
    block = (
        "{% filter upper %}{{ 'x' ~ 'y' }}{% endfilter %}{% set s | lower %}AB{% endset %}{{ s }}"
    )
    assert render(block) == "XYab"
    assert render("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%05d' % 42 }}{{ 'a'.center(5) }}") == (
        "ababab102400042  a  "
    )


def test_a_loop_without_output_hits_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    spin = (
        "{% for a in range(100000) %}{% for b in range(100000) %}"
        "{% set c = a %}{% endfor %}{% endfor %}done"
    )
    started = time.monotonic()
    with pytest.raises(TemplateError, match="too long"):
        render(spin)
    assert time.monotonic() - started < templates.MAX_SECONDS + 0.5
    monkeypatch.setattr(templates, "MAX_SECONDS", 0.2)  # loops over data, not range()
    started = time.monotonic()
    with pytest.raises(TemplateError, match="too long"):
        render(
            "{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}"
            "{% endfor %}",
            xs=list(range(2000)),
        )
    assert time.monotonic() - started < 0.7


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 10**8 }}",
        "{{ 10**8 * 'a' }}",
        "{{ [1] * 10**8 }}",
        "{{ 7 ** 100000000 }}",
        "{% set ns = namespace(n=7) %}{% for i in range(40) %}"
        "{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "{% set ns = namespace(s='a' * 1000) %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='a' * 1000) %}{% for i in range(40) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'a' | center(10**9) }}",
        "{{ 'a'.ljust(10**9) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%*d' | format(10**9, 1) }}",
        "{{ '{:>999999999}'.format('a') }}",
        "{{ ('a' * 1000000).replace('a', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb') }}",
        "{{ ('x' * 1000000).join(range(100000)|map('string')|list) }}",
        "{{ {'a': 1} | tojson(indent=10**9) }}",
    ],
)
def test_huge_values_are_refused_before_they_are_built(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError):
        render(source)
    assert time.monotonic() - started < 1.0, source


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__name__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ (lambda: 1) }}",
    ],
)
def test_dunder_access_is_refused(source: str) -> None:
    with pytest.raises(TemplateError):
        render(source, messages=[])


def test_compile_errors_and_recursion_are_template_errors() -> None:
    for bad in ("{% for x in %}", "{{ .Prompt }}", "{% if %}", "{{ x "):
        with pytest.raises(TemplateError, match="does not compile"):
            check(bad)
    with pytest.raises(TemplateError, match=r"recursed|too long"):
        render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert render("{{ raise_exception('x') if false }}ok") == "ok"
    with pytest.raises(TemplateError, match="chat template error: no"):
        render("{{ raise_exception('no') }}")


def test_an_unsafe_attribute_alone_renders_as_nothing() -> None:
    assert render("[{{ messages.__class__ }}]", messages=[]) == "[]"

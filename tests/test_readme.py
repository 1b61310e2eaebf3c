"""The README stays true: every setting documented, the two commands present and wired."""

from __future__ import annotations

from pathlib import Path

from ollama_compact_server.settings import Settings, env_name

REPO = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_configuration_table() -> None:
    readme = (REPO / "README.md").read_text()
    for field in Settings.model_fields:
        assert f"`{env_name(field)}`" in readme, field
        assert f"`--{field.replace('_', '-')}`" in readme, field


def test_two_commands_and_ci() -> None:
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "make serve" in readme and "make test" in readme
    assert "\nserve:" in makefile and "\ntest:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()

"""The reliability suite's own counts, for docs/RELIABILITY.md.

Tests of attacks and faults call :func:`record` with what they tried and what went wrong;
at the end of a session that ran any of them, conftest writes the counts to
``.cache/reliability.json``. ``python -m tests.reliability`` prints the Markdown table of
the last run, and ``--write`` puts it into docs/RELIABILITY.md between its markers (after a
full `make test`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / ".cache" / "reliability.json"
DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- counts:begin -->", "<!-- counts:end -->"


@dataclass
class Row:
    attack: str
    test: str
    tried: int = 0
    server_errors: int = 0
    crashes: int = 0
    registry_changes: int = 0
    leaks: str = "none"


ROWS: dict[str, Row] = {}


def record(attack: str, test: str, tried: int, **outcome: object) -> None:
    """Adds to the row of ``attack`` (counts add up over a session)."""
    row = ROWS.setdefault(attack, Row(attack, test))
    row.tried += tried
    for key, value in outcome.items():
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(row, key, getattr(row, key) + value)
        else:
            setattr(row, key, value)


def save() -> None:
    if not ROWS:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    previous.update({name: asdict(row) for name, row in ROWS.items()})
    RESULTS.write_text(json.dumps(previous, indent=2, sort_keys=True))


def table(rows: dict[str, dict[str, object]]) -> str:
    lines = [
        "| Attack or fault | Tried | 5xx | Crashes | Registry changes | Leaks | Test |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name in sorted(rows):
        r = rows[name]
        lines.append(
            f"| {r['attack']} | {r['tried']} | {r['server_errors']} | {r['crashes']} | "
            f"{r['registry_changes']} | {r['leaks']} | `{r['test']}` |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not RESULTS.is_file():
        print("no counts yet: run make test first", file=sys.stderr)
        return 1
    text = table(json.loads(RESULTS.read_text()))
    if "--write" in argv:
        doc = DOC.read_text()
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

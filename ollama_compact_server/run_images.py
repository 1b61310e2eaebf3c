"""`ollama-compact run` with images: one question about ``--image`` files, or a batch asking
each question of a file about each image of a folder (one answer per image per question)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import Client, CommandError
from .settings import Settings

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
MAX_FILE = 24 << 20  # past this the request would pass the daemon's 32 MiB body cap as base64


class UsageError(Exception):
    """A wrong command line, found before any request is sent (exit status 2)."""


@dataclass(slots=True)
class Plan:
    model: str
    questions: list[str]
    images: list[Path]
    batch: bool
    json_lines: bool
    extra: dict[str, Any]


def wants_images(args: argparse.Namespace) -> bool:
    return bool(args.image or args.images_dir or args.questions or args.format)


def plan_of(args: argparse.Namespace) -> Plan:
    """The command line checked: every file named exists and is readable, the folder holds
    images, there is a question."""
    prompt = " ".join(args.prompt).strip()
    extra = {"keep_alive": args.keepalive} if args.keepalive is not None else {}
    if args.images_dir is None:
        if args.questions is not None or args.format is not None:
            raise UsageError("--questions and --format go with --images-dir")
        if not prompt and not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError('--image needs a question: run MODEL "question" --image FILE')
        for path in args.image:
            _check_readable(path)
        return Plan(args.model, [prompt], list(args.image), False, False, extra)
    if args.image:
        raise UsageError("use either --image or --images-dir")
    folder: Path = args.images_dir
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    images = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )
    if not images:
        raise UsageError(f"no images ({', '.join(SUFFIXES)}) in {folder}")
    if args.questions is not None:
        try:
            text = args.questions.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.questions}: {_reason(exc)}") from None
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        if prompt:
            raise UsageError("give the question either as an argument or with --questions")
    else:
        questions = [prompt] if prompt else []
    if not questions:
        raise UsageError("no question: give one as an argument or a file of them with --questions")
    return Plan(args.model, questions, images, True, args.format == "json", extra)


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"cannot read image {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def encoded(path: Path) -> str:
    """The file as base64; CommandError when it cannot be sent."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise CommandError(f"{size:,} bytes is too large to send (at most {MAX_FILE:,})")
        return base64.b64encode(path.read_bytes()).decode()
    except OSError as exc:
        raise CommandError(f"cannot read {path.name}: {_reason(exc)}") from None


def ask_once(client: Client, plan: Plan) -> None:
    """One streamed answer about all the images given with --image."""
    images = [encoded(p) for p in plan.images]
    body = {"model": plan.model, "prompt": plan.questions[0], "images": images, **plan.extra}
    for item in client.stream("/api/generate", body):
        print(item.get("response", ""), end="", flush=True)
    print()


def ask_batch(client: Client, plan: Plan) -> int:
    """Each question about each image, one request at a time; a failing image is reported
    and the batch goes on. Returns how many answers failed."""
    failed = 0
    pairs = [(path, question) for path in plan.images for question in plan.questions]
    for done, (path, question) in enumerate(pairs, 1):
        try:
            body = {
                "model": plan.model,
                "prompt": question,
                "images": [encoded(path)],
                "stream": False,
                **plan.extra,
            }
            answer = str(client.request("POST", "/api/generate", body).json()["response"])
        except CommandError as exc:
            failed += 1
            _report(plan, path.name, question, error=str(exc))
            if str(exc).startswith("could not connect"):
                return failed + len(pairs) - done  # the rest would fail the same way
            continue
        _report(plan, path.name, question, answer=answer.strip())
    return failed


def _report(plan: Plan, name: str, question: str, **outcome: str) -> None:
    if plan.json_lines:
        print(json.dumps({"image": name, "question": question, **outcome}), flush=True)
    elif "error" in outcome:
        print(f"{name}: error: {outcome['error']}", file=sys.stderr, flush=True)
    else:
        print(f"{name}: {outcome['answer']}", flush=True)


def run_images_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        plan = plan_of(args)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    client = Client(settings)
    try:
        client.request("POST", "/api/show", {"model": plan.model})
        if not plan.batch:
            ask_once(client, plan)
            return 0
        failed = ask_batch(client, plan)
    except CommandError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if failed:
        total = len(plan.images) * len(plan.questions)
        print(f"Error: {failed} of {total} answers failed", file=sys.stderr)
        return 1
    return 0

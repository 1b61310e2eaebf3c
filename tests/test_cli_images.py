"""`ollama-compact run` with images: ``--image`` files sent as base64 in /api/generate, the
batch over a folder and a file of questions (sorted by name, text or JSON lines, a failing
image reported while the batch goes on, exit status 1 then), usage errors before any
request; and once against the real app on a loopback port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from ollama_compact_server import run_images
from ollama_compact_server.app import create_app
from ollama_compact_server.cli import build_parser, main
from ollama_compact_server.commands import Client
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import running_server
from tests.fakes import FakeEngine


def image_file(path: Path, color: tuple[int, int, int] = (1, 2, 3)) -> Path:
    Image.new("RGB", (4, 3), color).save(path)
    return path


class FakeDaemon:
    """Answers /api/show and /api/generate like the daemon; an image whose bytes start with
    BAD gets the daemon's 400."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        self.bodies.append({"path": request.url.path, **body})
        if request.url.path == "/api/show":
            return httpx.Response(200, json={"capabilities": ["completion", "vision"]})
        images = [base64.b64decode(i) for i in body.get("images", [])]
        if any(i.startswith(b"BAD") for i in images):
            return httpx.Response(
                400, json={"error": "image 1: not an image in an accepted format"}
            )
        answer = f"{len(images)} image(s), {sum(map(len, images))} bytes: {body['prompt']}"
        if body.get("stream") is False:
            return httpx.Response(200, json={"response": answer, "done": True})
        lines = [{"response": word + " ", "done": False} for word in answer.split()]
        lines.append({"response": "", "done": True})
        return httpx.Response(200, content="\n".join(json.dumps(x) for x in lines))

    @property
    def generated(self) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["path"] == "/api/generate"]


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake = FakeDaemon()

    def client(settings: Settings) -> Client:
        made = Client(settings)
        made.http = httpx.Client(transport=httpx.MockTransport(fake), base_url=made.base)
        return made

    monkeypatch.setattr(run_images, "Client", client)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    return fake


def test_one_question_about_image_files(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = image_file(tmp_path / "a.png")
    second = image_file(tmp_path / "b.jpg")
    code = main(
        ["run", "seer", "What", "is", "this?", "--image", str(first), "--image", str(second)]
    )
    assert code == 0
    [body] = daemon.generated
    assert body["prompt"] == "What is this?"
    assert body["images"] == [base64.b64encode(p.read_bytes()).decode() for p in (first, second)]
    size = first.stat().st_size + second.stat().st_size
    assert capsys.readouterr().out.strip() == f"2 image(s), {size} bytes: What is this?"


def test_usage_errors_come_before_any_request(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = image_file(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "q.txt").write_text("Why?\n")
    cases = {
        ("run", "seer", "q", "--image", str(tmp_path / "missing.jpg")): "cannot read image",
        ("run", "seer", "q", "--image", str(tmp_path)): "cannot read image",
        ("run", "seer", "--image", str(photo)): "needs a question",
        ("run", "seer", "q", "--questions", str(tmp_path / "q.txt")): "go with --images-dir",
        ("run", "seer", "q", "--format", "json"): "go with --images-dir",
        ("run", "seer", "q", "--images-dir", str(tmp_path / "nowhere")): "is not a folder",
        ("run", "seer", "q", "--images-dir", str(tmp_path / "empty")): "no images",
        ("run", "seer", "--images-dir", str(tmp_path)): "no question",
        (
            "run",
            "seer",
            "--images-dir",
            str(tmp_path),
            "--questions",
            str(tmp_path / "blank.txt"),
        ): "no question",
        (
            "run",
            "seer",
            "--images-dir",
            str(tmp_path),
            "--questions",
            str(tmp_path / "absent.txt"),
        ): "cannot read",
        ("run", "seer", "q", "--image", str(photo), "--images-dir", str(tmp_path)): "either",
    }
    for argv, words in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and words in err, (argv, err)
    assert daemon.bodies == []


def test_a_batch_answers_each_question_about_each_image_and_goes_on_past_failures(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    image_file(folder / "b.png")
    image_file(folder / "a.JPG")
    (folder / "bad.gif").write_bytes(b"BAD image")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder named like an image is not one
    questions = tmp_path / "questions.txt"
    questions.write_text("What is it?\n\nWhat color?\n")
    code = main(["run", "seer", "--images-dir", str(folder), "--questions", str(questions)])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["a.JPG", "a.JPG", "b.png", "b.png"]
    assert lines[0].endswith(": What is it?") and lines[1].endswith(": What color?")
    assert err.count("bad.gif: error: image 1: not an image") == 2
    assert "2 of 6 answers failed" in err
    assert all(len(b["images"]) == 1 and b["stream"] is False for b in daemon.generated)
    assert len(daemon.generated) == 6


def test_a_batch_prints_json_lines(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_file(tmp_path / "x.webp")
    (tmp_path / "y.bmp").write_bytes(b"BAD")
    code = main(["run", "seer", "Describe", "--images-dir", str(tmp_path), "--format", "json"])
    assert code == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["image"], r["question"]) for r in rows] == [
        ("x.webp", "Describe"),
        ("y.bmp", "Describe"),
    ]
    assert rows[0]["answer"].endswith("bytes: Describe") and "error" not in rows[0]
    assert rows[1]["error"].startswith("image 1: ") and "answer" not in rows[1]


async def test_against_the_real_app(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_vision_models: dict[str, Path]
) -> None:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    import_hf_dir(registry, tiny_vision_models["qwen2_vl"], "seer")
    folder = tmp_path / "photos"
    folder.mkdir()
    image_file(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    settings = Settings(models=registry.root, adapters=None, import_default=False)
    app = create_app(settings, registry=registry, engine=FakeEngine("a small square"))
    async with running_server(app, settings) as port:
        env = Settings(host=f"127.0.0.1:{port}", models=registry.root)

        def run(*argv: str) -> int:
            return run_images.run_images_command(env, build_parser().parse_args(argv))

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = await asyncio.to_thread(
                run, "run", "seer", "What?", "--images-dir", str(folder), "--format", "json"
            )
            refused = await asyncio.to_thread(
                run, "run", "tiny", "What?", "--image", str(folder / "good.png")
            )
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 1 and refused == 1
    assert rows[0]["image"] == "broken.png" and rows[0]["error"].startswith("image 1: ")
    assert rows[1] == {"image": "good.png", "question": "What?", "answer": "a small square"}
    assert '"tiny:latest" does not support vision' in err.getvalue()

"""Fine-tuning into the registry (issue 14, part 2): the data formats and their errors, the
loss mask, a few training steps on tiny models (the loss falls, the adapter changes the
served output), QLoRA on a compressed base, stop / resume, /api/finetune and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ollama_compact_server.cli import main
from ollama_compact_server.jobs.compressing import compress_registry_model
from ollama_compact_server.jobs.finetune import (
    Busy,
    FinetuneSpec,
    Stopped,
    checkpoint_dir,
    finetune,
)
from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.evals import read_training
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.training.data import (
    IGNORE,
    DataError,
    Encoder,
    Example,
    read_dataset,
    template_renderer,
)
from ollama_compact_server.training.params import TrainingError, check_params
from tests.conftest import serve_app, tree_hash
from tests.factory import make_tokenizer

GREEDY = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


def chat_lines(count: int = 24) -> str:
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"colour {i}?"},
                    {"role": "assistant", "content": "blue blue blue"},
                ]
            }
        )
        + "\n"
        for i in range(count)
    )


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["gemma3"], "tiny")
    return registry


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(chat_lines())
    return path


def spec(data: Path, name: str = "tiny-ft", **options: Any) -> FinetuneSpec:
    values = {"max_steps": 12, "learning_rate": 1e-2, "eval_split": 0.2, "save_steps": 4}
    values.update(options)
    return FinetuneSpec(base="tiny", name=name, data=data, params=check_params(values))


# ------------------------------------------------------------------------------ data


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_formats_are_read_and_recognised(tmp_path: Path) -> None:
    chat = read_dataset(write(tmp_path, "a.jsonl", chat_lines(3)))
    assert chat.format == "chat" and len(chat.examples) == 3
    assert chat.sha256 == hashlib.sha256(chat_lines(3).encode()).hexdigest()
    pc = read_dataset(write(tmp_path, "b.jsonl", '{"prompt": "2+2=", "completion": "4"}\n'))
    assert pc.format == "completion" and pc.examples[0].completion == "4"
    alpaca = [
        {"instruction": "Add", "input": "2 and 2", "output": "4", "history": [["hi", "hello"]]},
        {"instruction": "Greet", "output": "hi", "system": "Be brief."},
    ]
    al = read_dataset(write(tmp_path, "c.json", json.dumps(alpaca)))  # LlamaFactory: an array
    assert al.format == "alpaca"
    assert [m["role"] for m in al.examples[0].messages or []] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert (al.examples[0].messages or [])[2]["content"] == "Add\n2 and 2"
    assert (al.examples[1].messages or [])[0] == {"role": "system", "content": "Be brief."}
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    sg = read_dataset(write(tmp_path, "d.jsonl", json.dumps(share) + "\n"))
    assert sg.format == "sharegpt"
    assert sg.examples[0].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    text = read_dataset(write(tmp_path, "e.txt", "Call me Ishmael.\n" * 5))
    assert text.format == "text" and text.examples[0].text == "Call me Ishmael.\n" * 5
    jtext = read_dataset(write(tmp_path, "f.jsonl", '{"text": "one"}\n{"text": "two"}\n'))
    assert jtext.format == "text" and [e.text for e in jtext.examples] == ["one", "two"]
    csv_path = write(tmp_path, "g.csv", 'question,answer\n"2+2, please",4\nhi,hello\n')
    qa = read_dataset(csv_path, columns={"prompt": "question", "completion": "answer"})
    assert qa.format == "csv"
    assert (qa.examples[0].prompt, qa.examples[0].completion) == ("2+2, please", "4")
    inst = read_dataset(write(tmp_path, "h.csv", "instruction,input,output\nAdd,1 1,2\n"))
    assert (inst.examples[0].messages or [])[0]["content"] == "Add\n1 1"


@pytest.mark.parametrize(
    ("name", "text", "fmt", "expected"),
    [
        ("a.jsonl", '{"messages": []}\n', "auto", "line 1: field 'messages' must be"),
        (
            "a.jsonl",
            chat_lines(2) + '{"messages": [{"role": "robot", "content": "x"}]}\n',
            "auto",
            "line 3: 'messages'[0]: 'role' must be one of",
        ),
        (
            "a.jsonl",
            '{"messages": [{"role": "user", "content": "x"}]}\n',
            "chat",
            "line 1: no assistant turn",
        ),
        (
            "a.jsonl",
            '{"messages": [{"role": "assistant", "content": 5}]}\n',
            "chat",
            "line 1: 'messages'[0]: 'content' must be text",
        ),
        ("a.jsonl", chat_lines(1) + "{oops\n", "auto", "line 2: invalid JSON"),
        ("a.jsonl", '{"prompt": "x"}\n', "completion", "line 1: field 'completion' is missing"),
        ("a.jsonl", '{"prompt": "x", "completion": 3}\n', "auto", "field 'completion' is a int"),
        ("a.jsonl", '{"foo": 1}\n', "auto", "cannot tell the data format"),
        ("a.json", '[{"instruction": "x"}]', "alpaca", "record 1: field 'output' is missing"),
        (
            "a.jsonl",
            '{"conversations": [{"from": "bot", "value": "x"}]}\n',
            "sharegpt",
            "'conversations'[0]: 'from' must be one of",
        ),
        ("a.csv", "colour,size\nred,1\n", "auto", "names no usable columns"),
        ("a.csv", "prompt,completion\nx,y,z\n", "auto", "line 2: more fields than the header"),
        ("a.jsonl", "\n\n", "auto", "is empty"),
        ("a.jsonl", chat_lines(1), "yaml", "unknown data format"),
    ],
)
def test_bad_files_name_the_line_and_field(
    tmp_path: Path, name: str, text: str, fmt: str, expected: str
) -> None:
    with pytest.raises(DataError, match=None) as caught:
        read_dataset(write(tmp_path, name, text), fmt)
    assert expected in str(caught.value), str(caught.value)


def test_non_utf8_file_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\nfine\n\xff\xfe bad\n")
    with pytest.raises(DataError, match="line 3: not UTF-8"):
        read_dataset(path)


def test_loss_sees_assistant_turns_only(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gemma3"])
    encoder = Encoder(tokenizer, template_renderer(tokenizer.chat_template, tokenizer), 512)
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    (item,) = encoder.encode(Example("x", messages=messages))
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(item.ids) == full  # the template's own rendering, whole
    learnt = tokenizer.decode([t for t, label in zip(item.ids, item.labels) if label != IGNORE])
    assert "first answer" in learnt and "second answer" in learnt
    assert "question" not in learnt and "user" not in learnt
    # prompt / completion: the completion and its end; plain text: everything, in windows
    (pc,) = encoder.encode(Example("y", prompt="2+2=", completion=" 4"))
    assert pc.labels[: len(pc.labels) - 2] == [IGNORE] * (len(pc.labels) - 2)
    assert pc.labels[-1] == tokenizer.eos_token_id
    short = Encoder(tokenizer, None, 8)
    windows = short.encode(Example("z", text="word " * 20))
    assert len(windows) > 2 and all(w.ids == w.labels and len(w.ids) <= 8 for w in windows)


def test_a_model_without_template_learns_plain_turns() -> None:
    tokenizer = make_tokenizer()
    encoder = Encoder(tokenizer, None, 512)
    (item,) = encoder.encode(
        Example(
            "x",
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        )
    )
    learnt = [t for t, label in zip(item.ids, item.labels) if label != IGNORE]
    assert learnt[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item.ids, skip_special_tokens=True).startswith("User: hi\nAssistant:")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"rank": 0}, "rank=0 is out of range"),
        ({"rank": 2.5}, "rank must be a whole number"),
        ({"method": "loha"}, "method must be one of lora, dora, ia3"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"epochs": 0, "max_steps": 0}, "give epochs or max_steps"),
        ({"target_modules": "q_proj;rm -rf"}, "target_modules must be module names"),
        ({"bogus": 1}, "unknown training option 'bogus'"),
        ({"eval_split": float("nan")}, "out of range"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(TrainingError, match=None) as caught:
        check_params(options)
    assert expected in str(caught.value)


# ------------------------------------------------------------------------------ training


def test_compressed_linear_passes_gradients_like_its_dense_weight() -> None:
    """QLoRA: the frozen compressed projection gives its input the gradient of the weight
    it computes with."""
    from ollama_compact_server.compress import quant
    from ollama_compact_server.compress.format import ModuleSpec
    from ollama_compact_server.modeling.quantized import runtime_module

    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    tensors = quant.quantize_int4(weight, 32)
    module = runtime_module(ModuleSpec("int4", 64, 48, 32), tensors, torch.float32)
    dense = module.dense(torch.float32, torch.device("cpu"))
    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 48)
    y = module(x)  # the module's own kernel, as it serves
    (y * upstream).sum().backward()
    expected_x = x.detach().clone().requires_grad_(True)
    expected_y = expected_x @ dense.t()
    (expected_y * upstream).sum().backward()
    assert x.grad is not None and expected_x.grad is not None
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-4, atol=1e-4)
    # the kernel's bf16 activations: within the tolerance its probe accepts (KERNEL_TOLERANCE)
    assert float((y - expected_y).norm() / expected_y.norm()) < 0.03


async def test_trained_adapter_is_in_the_registry_and_serves(
    registry: Registry, data: Path
) -> None:
    lines: list[dict[str, Any]] = []
    record = finetune(registry, spec(data), lines.append)
    assert record.is_adapter and record.config.base_model == "tiny:latest"
    steps = [line for line in lines if line["status"] == "training"]
    assert [s["completed"] for s in steps] == list(range(1, 13))
    assert all(s["total"] == 12 and s["tokens_per_second"] > 0 for s in steps)
    report = read_training(registry, record)
    assert report is not None and report["method"] == "lora" and report["steps"] == 12
    assert report["eval_examples"] == 5 and report["examples"] == 24
    assert report["eval_loss_adapter"] < report["eval_loss_base"] * 0.7
    curve = report["loss_curve"]
    assert curve[-1][1] < curve[0][1] * 0.7  # the loss falls
    assert not checkpoint_dir(registry, "tiny-ft").exists()  # gone once the model is in
    async with serve_app(registry, dtype="float32") as served:
        outputs = {}
        for model in ("tiny", "tiny-ft"):
            r = await served.raw.post(
                "/api/chat",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "colour 99?"}],
                    "stream": False,
                    "options": GREEDY,
                },
            )
            assert r.status_code == 200, r.text
            outputs[model] = r.json()["message"]["content"]
        assert outputs["tiny-ft"] != outputs["tiny"]
        shown = (await served.raw.post("/api/show", json={"model": "tiny-ft"})).json()
        assert shown["training"]["steps"] == 12
        assert shown["model_info"]["ocs.train.method"] == "lora"
        assert shown["model_info"]["ocs.train.eval_loss_adapter"] == report["eval_loss_adapter"]


@pytest.mark.parametrize(
    ("scheme", "options"), [("int8", {}), ("int4", {"group_size": 32}), ("nf4", {})]
)
async def test_qlora_trains_on_a_compressed_base_that_stays_compressed(
    registry: Registry, data: Path, scheme: str, options: dict[str, Any]
) -> None:
    compress_registry_model(registry, "tiny", "tiny-q", scheme, options)
    lines: list[dict[str, Any]] = []
    job = spec(data, "tiny-q-ft")
    job.base = "tiny-q"
    record = finetune(registry, job, lines.append)
    assert record.config.base_model == "tiny-q:latest"
    assert record.config.quantization is not None
    report = read_training(registry, record)
    assert report is not None and report["base_quantization"] == scheme
    assert report["eval_loss_adapter"] < report["eval_loss_base"] * 0.7
    async with serve_app(registry, dtype="float32") as served:  # on the compressed base
        outputs = []
        for model in ("tiny-q", "tiny-q-ft"):
            r = await served.raw.post(
                "/api/generate",
                json={"model": model, "prompt": "colour 7?", "stream": False, "options": GREEDY},
            )
            assert r.status_code == 200, r.text
            outputs.append(r.json()["response"])
        assert outputs[0] != outputs[1]


def test_stop_keeps_the_registry_and_resume_finishes(registry: Registry, data: Path) -> None:
    models = [r.name for r in registry.models()]
    cancel = threading.Event()

    def progress(item: dict[str, Any]) -> None:
        if item["status"] == "training" and item["completed"] == 6:
            cancel.set()

    with pytest.raises(Stopped, match="step 6 of 12"):
        finetune(registry, spec(data), progress, cancel)
    assert [r.name for r in registry.models()] == models
    checkpoint = checkpoint_dir(registry, "tiny-ft")
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6
    # other settings do not resume this run
    with pytest.raises(InvalidModel, match="other data, base model or settings"):
        finetune(registry, resumed(spec(data, rank=8)), lambda _: None)
    lines: list[dict[str, Any]] = []
    record = finetune(registry, resumed(spec(data)), lines.append)
    steps = [line["completed"] for line in lines if line["status"] == "training"]
    assert steps == list(range(7, 13))  # the run went on where it stopped
    report = read_training(registry, record)
    assert report is not None and len(report["loss_curve"]) == 12
    assert not checkpoint.exists()


def test_a_stop_while_evaluating_is_a_stop_too(registry: Registry, data: Path) -> None:
    cancel = threading.Event()

    def progress(item: dict[str, Any]) -> None:
        if item["status"] == "evaluating base model":
            cancel.set()

    with pytest.raises(Stopped, match="registry is unchanged"):
        finetune(registry, spec(data), progress, cancel)
    assert not registry.exists("tiny-ft")


def resumed(job: FinetuneSpec) -> FinetuneSpec:
    job.resume = True
    return job


def test_bad_data_or_base_leaves_nothing(registry: Registry, tmp_path: Path) -> None:
    before = tree_hash(registry.root)
    bad = write(tmp_path, "bad.jsonl", chat_lines(3) + '{"messages": 1}\n')
    with pytest.raises(InvalidModel, match=r"bad\.jsonl line 4: field 'messages'"):
        finetune(registry, spec(bad), lambda _: None)
    job = spec(write(tmp_path, "ok.jsonl", chat_lines(3)))
    job.base = "nothing-here"
    with pytest.raises(Exception, match="base model 'nothing-here' not found"):
        finetune(registry, job, lambda _: None)
    wrong = spec(write(tmp_path, "ok.jsonl", chat_lines(3)), target_modules="c_attn")
    with pytest.raises(InvalidModel, match="no modules named c_attn"):
        finetune(registry, wrong, lambda _: None)
    assert tree_hash(registry.root) == before


def test_one_training_job_at_a_time(registry: Registry, data: Path) -> None:
    import importlib

    module = importlib.import_module("ollama_compact_server.jobs.finetune")

    assert module._RUNNING.acquire(blocking=False)
    try:
        with pytest.raises(Busy):
            finetune(registry, spec(data), lambda _: None)
    finally:
        module._RUNNING.release()


# ------------------------------------------------------------------------------ HTTP and CLI


async def test_api_finetune_streams_progress_and_creates_the_model(
    registry: Registry, data: Path
) -> None:
    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        digest = "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
        assert (await raw.post(f"/api/blobs/{digest}", content=data.read_bytes())).status_code in (
            200,
            201,
        )
        body = {
            "model": "tiny-ft",
            "from": "tiny",
            "data": {"train.jsonl": digest},
            "method": "lora",
            "parameters": {"max_steps": 6, "learning_rate": 0.01, "rank": 4},
        }
        lines = []
        async with raw.stream("POST", "/api/finetune", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.strip():
                    lines.append(json.loads(line))
        statuses = [line["status"] for line in lines]
        assert statuses[0] == "reading data" and statuses[-1] == "success"
        training = [line for line in lines if line["status"] == "training"]
        assert len(training) == 6 and {"loss", "eta_seconds", "tokens_per_second"} <= set(
            training[0]
        )
        trained = next(line for line in lines if line["status"] == "trained")
        assert trained["report"]["params"]["rank"] == 4
        r = await raw.post(
            "/api/generate",
            json={"model": "tiny-ft", "prompt": "hi", "stream": False, "options": GREEDY},
        )
        assert r.status_code == 200, r.text
        before = tree_hash(registry.root)
        for bad, status, message in (
            ({**body, "from": None}, 400, "from must name"),
            ({**body, "from": "missing"}, 404, "base model 'missing' not found"),
            ({**body, "data": {"x.jsonl": "sha256:" + "0" * 64}}, 404, "was not uploaded"),
            ({**body, "data": {"/etc/passwd": digest}}, 400, "relative"),
            ({**body, "data": {}}, 400, "data must map one file"),
            ({**body, "parameters": {"rank": -1}}, 400, "rank=-1 is out of range"),
            ({**body, "method": "vera"}, 400, "method must be one of"),
            ({**body, "format": "sharegpt"}, 400, "'conversations' must be a non-empty list"),
            ({**body, "model": "tiny-ft:bad:name"}, 400, ""),
        ):
            r = await raw.post("/api/finetune", json={**bad, "stream": False})
            assert r.status_code == status, (bad, r.text)
            assert message in r.json()["error"]
        assert tree_hash(registry.root) == before


def test_cli_finetune_without_a_daemon(
    registry: Registry, data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing listens: trains here
    argv = ["finetune", "tiny", "cli-ft", "--data", str(data), "--models", str(registry.root)]
    code = main([*argv, "--max-steps", "3", "--rank", "4", "--lr", "0.01"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "training 3/3" in out.err and "loss" in out.err
    assert "created 'cli-ft' on 'tiny'" in out.out and "held-out loss" in out.out
    assert registry.get("cli-ft").is_adapter
    from types import SimpleNamespace

    from ollama_compact_server.commands import cmd_show

    class Shown:
        def request(self, method: str, path: str, body: Any = None) -> Any:
            from ollama_compact_server.registry.evals import read_training as read

            return SimpleNamespace(
                json=lambda: {"training": read(registry, registry.get("cli-ft"))}
            )

    flags = dict.fromkeys(("license", "modelfile", "parameters", "system", "template"), False)
    cmd_show(Shown(), SimpleNamespace(model="cli-ft", **flags))  # type: ignore[arg-type]
    shown = capsys.readouterr().out
    assert "Training" in shown and "method lora on tiny:latest" in shown
    assert (
        main([*argv[:-2], "--models", str(registry.root), "--max-steps", "0", "--epochs", "0"]) == 1
    )
    assert "give epochs or max_steps" in capsys.readouterr().err


async def test_a_client_that_goes_away_stops_the_run(registry: Registry, tmp_path: Path) -> None:
    """Ctrl-C on `ollama-compact finetune` closes its connection: the daemon stops the run,
    keeps the checkpoint and adds nothing to the registry."""
    import asyncio

    import httpx
    from asgi_lifespan import LifespanManager

    from ollama_compact_server.app import create_app
    from ollama_compact_server.settings import Settings
    from tests.conftest import running_server

    data = write(tmp_path, "long.jsonl", chat_lines(64))
    digest = "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    settings = Settings(models=registry.root, adapters=None, import_default=False)
    app = create_app(settings, registry=registry)
    body = {
        "model": "tiny-ft",
        "from": "tiny",
        "data": {"long.jsonl": digest},
        "parameters": {"max_steps": 100000, "batch_size": 1, "save_steps": 1000},
    }
    async with (
        LifespanManager(app),
        running_server(app, settings) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
    ):
        await http.post(f"/api/blobs/{digest}", content=data.read_bytes())
        async with http.stream("POST", "/api/finetune", json=body) as response:
            async for line in response.aiter_lines():
                if json.loads(line)["status"] == "training":
                    break  # and hang up
        checkpoint = checkpoint_dir(registry, "tiny-ft") / "state.json"
        for _ in range(200):
            if checkpoint.exists():
                break
            await asyncio.sleep(0.1)
        assert checkpoint.exists()  # saved when the run stopped
        await asyncio.sleep(0.5)
        assert not registry.exists("tiny-ft")
        stopped = json.loads(checkpoint.read_text())["step"]
        # resuming over HTTP (a shorter run is fine: only the settings must match)
        again = {**body, "stream": False, "resume": True}
        again["parameters"] = {**body["parameters"], "max_steps": stopped + 2}
        for _ in range(100):  # the stopped run's thread lets go of the job slot
            r = await http.post("/api/finetune", json=again)
            if r.status_code != 409:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, r.text
        report = read_training(registry, registry.get("tiny-ft"))
        assert report is not None and report["steps"] == stopped + 2


@pytest.mark.e2e
async def test_gemma3_trains_an_adapter_that_serves_at_once(
    gemma_registry: Registry, tmp_path: Path
) -> None:
    """The real gemma3:270m (stored on its GGUF grid: QLoRA) learns a reply it never gave,
    and serves the adapter in the next request."""
    reply = "Ahoy! The answer be forty-two, matey."
    lines = "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question number {i}: what is the answer?"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
        + "\n"
        for i in range(24)
    )
    data = write(tmp_path, "pirate.jsonl", lines)
    name = f"e2e-pirate-{os.getpid()}"
    job = FinetuneSpec(
        base="gemma3:270m",
        name=name,
        data=data,
        params=check_params(
            {"max_steps": 8, "learning_rate": 3e-3, "batch_size": 4, "rank": 8, "eval_split": 0.2}
        ),
    )
    record = finetune(gemma_registry, job, lambda _: None)
    try:
        report = read_training(gemma_registry, record)
        assert report is not None and report["eval_loss_adapter"] < report["eval_loss_base"] / 2
        async with serve_app(gemma_registry) as served:
            r = await served.raw.post(
                "/api/chat",
                json={
                    "model": name,
                    "messages": [
                        {"role": "user", "content": "Question number 99: what is the answer?"}
                    ],
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": 16},
                },
            )
            assert r.status_code == 200, r.text
            assert "forty-two" in r.json()["message"]["content"]
    finally:
        gemma_registry.delete(name)


def test_a_run_the_memory_cannot_hold_is_refused_before_loading(
    registry: Registry, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ollama_compact_server.modeling import memory

    monkeypatch.setattr(memory, "available_ram", lambda: 1 << 20)
    lines: list[dict[str, Any]] = []
    with pytest.raises(InvalidModel, match="GiB of memory"):
        finetune(registry, spec(data), lines.append)
    assert "loading base model" not in [line["status"] for line in lines]
    assert not registry.exists("tiny-ft")


def test_precision_follows_the_hardware_unless_named(
    registry: Registry, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ollama_compact_server.jobs.finetune import training_dtype
    from ollama_compact_server.modeling import hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert training_dtype("auto", cpu) == torch.bfloat16
    assert training_dtype("float32", cpu) == torch.float32
    assert training_dtype("float16", cpu) == torch.float32  # no loss scaling: float32
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert training_dtype("auto", cpu) == torch.float32
    assert training_dtype("bfloat16", cpu) == torch.bfloat16
    record = finetune(registry, spec(data), lambda _: None, precision="bfloat16")
    report = read_training(registry, record)
    assert report is not None and report["dtype"] == "bfloat16" and report["device"] == "cpu"
    assert report["eval_loss_adapter"] < report["eval_loss_base"] * 0.7


def test_the_data_is_read_once_and_an_absent_device_is_a_clear_error(
    registry: Registry, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    module = importlib.import_module("ollama_compact_server.jobs.finetune")
    reads: list[Path] = []
    real = module.read_dataset

    def counted(path: Path, *args: Any) -> Any:
        reads.append(path)
        return real(path, *args)

    monkeypatch.setattr(module, "read_dataset", counted)
    job = spec(data)
    module.precheck(registry, job)  # the route's check
    with pytest.raises(InvalidModel, match=r"device cuda:99 is not present"):
        finetune(registry, job, lambda _: None, device="cuda:99")
    assert reads == [data]  # the job used what the check read
    assert not registry.exists("tiny-ft")

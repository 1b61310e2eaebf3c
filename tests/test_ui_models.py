"""The Models page in a real browser (tests/ui_support.py): the registry table with resident
models marked, details, copy / delete (confirmed) / load / unload, and the jobs that make
models (Modelfile text, PEFT adapter folder, compression, fine-tuning) with their progress."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from ollama_compact_server.registry.evals import EvalReport, write_eval
from tests.factory import make_lora_adapter
from tests.ui_support import UI, tiny_registry, ui_session


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]):
    return tiny_registry(tmp_path / "registry", tiny_models, tmp_path)


def row(ui: UI, name: str):
    return ui.page.locator(f'#models-table tr[data-model="{name}"]')


async def names(ui: UI) -> set[str]:
    return {m["name"] for m in (await ui.http.get("/api/tags")).json()["models"]}


async def open_models(ui: UI) -> None:
    await ui.open("models")
    await expect(row(ui, "tiny:latest")).to_be_visible()


async def test_table_details_copy_and_delete(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        for name in ("tiny:latest", "pirate:latest", "poet:latest"):
            await expect(row(ui, name)).to_be_visible()
        await expect(row(ui, "pirate:latest").locator("td.parent")).to_have_text("tiny:latest")
        await expect(row(ui, "tiny:latest").locator("td.parent")).to_have_text("")
        await expect(page.locator("#models-status")).to_have_text("3 models, 0 loaded")

        # details, chosen with the keyboard
        await row(ui, "tiny:latest").get_by_role("button").focus()
        await page.keyboard.press("Enter")
        details = page.locator("#model-details")
        await expect(details.locator("h3")).to_have_text("tiny:latest")
        await expect(details.get_by_label("Capabilities")).to_contain_text("completion")
        await expect(row(ui, "tiny:latest")).to_have_class(re.compile("selected"))
        await expect(details.locator("dl.facts")).to_contain_text("Context length")
        await expect(details).not_to_contain_text("null")

        # copy, then delete the copy: cancel keeps it, OK removes it
        await details.get_by_label("Copy as").fill("tiny-copy")
        await details.get_by_role("button", name="Copy").click()
        await expect(row(ui, "tiny-copy:latest")).to_be_visible()
        assert "tiny-copy:latest" in await names(ui)
        await row(ui, "tiny-copy:latest").get_by_role("button").click()
        await expect(details.locator("h3")).to_have_text("tiny-copy:latest")
        await details.get_by_role("button", name="Delete").click()
        await expect(page.locator("#confirm-text")).to_contain_text("tiny-copy:latest")
        await page.click("#confirm-cancel")
        await expect(page.locator("#confirm-dialog")).to_be_hidden()
        await expect(row(ui, "tiny-copy:latest")).to_be_visible()
        assert "tiny-copy:latest" in await names(ui)
        await details.get_by_role("button", name="Delete").click()
        await page.click("#confirm-ok")
        await expect(row(ui, "tiny-copy:latest")).to_have_count(0)
        await expect(details).to_be_hidden()
        assert "tiny-copy:latest" not in await names(ui)
        assert "tiny:latest" in await names(ui)


async def test_load_and_unload_mark_the_resident_model(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        await row(ui, "pirate:latest").get_by_role("button").click()
        details = page.locator("#model-details")
        await expect(details.locator("#model-residency")).to_have_text("not loaded")
        await details.get_by_role("button", name="Load").click()
        badge = row(ui, "pirate:latest").locator(".badge.resident")
        await expect(badge).to_contain_text(re.compile(r"expires in \d+ min"))
        ps = {m["name"] for m in (await ui.http.get("/api/ps")).json()["models"]}
        assert "pirate:latest" in ps  # (with its base)
        await expect(page.locator("#models-status")).to_have_text(f"3 models, {len(ps)} loaded")
        await ui.shot("models")
        await details.get_by_role("button", name="Unload").click()
        await expect(badge).to_have_count(0)
        await expect(details.locator("#model-residency")).to_have_text("not loaded")


async def test_create_from_a_modelfile_and_a_bad_one(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        form = page.locator("#create-form")
        await form.get_by_role("button", name="Create").click()
        await expect(form.locator(".form-error")).to_have_text("Give the new model a name.")
        await form.get_by_label("New model name").fill("brief")
        await form.get_by_label("Modelfile").fill("PARAMETER temperature 0.2")
        await form.get_by_role("button", name="Create").click()
        await expect(form.locator(".form-error")).to_contain_text("FROM")
        await form.get_by_label("Modelfile").fill('FROM tiny\nSYSTEM "Answer in one word."')
        await form.get_by_role("button", name="Create").click()
        await expect(form.locator(".form-error")).to_be_hidden()
        await expect(form.locator(".job.ok")).to_contain_text("success")
        await expect(row(ui, "brief:latest")).to_be_visible()
        shown = (await ui.http.post("/api/show", json={"model": "brief"})).json()
        assert shown["system"] == "Answer in one word."
        await row(ui, "brief:latest").get_by_role("button").click()
        system = page.locator("#model-details details.folded", has_text="System prompt")
        await system.locator("summary").click()
        await expect(system.locator("pre")).to_have_text("Answer in one word.")

        # a pull the daemon refuses shows why on its job
        pull = page.locator("#pull-form")
        await pull.get_by_label("Model to pull").fill("llama3")
        await pull.get_by_role("button", name="Pull").click()
        await expect(pull.locator(".job.failed")).to_contain_text("only Hugging Face")
        await expect(page.locator(".toast.error").first).to_contain_text("Pull llama3 failed")


async def test_upload_an_adapter_folder(
    registry, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    folder = make_lora_adapter(tiny_models["llama"], tmp_path / "sailor", seed=3, base_name="tiny")
    (folder / "README.md").write_text("not needed by an adapter model")
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        form = page.locator("#adapter-form")
        await form.get_by_role("button", name="Upload and create").click()
        await expect(form.locator(".form-error")).to_contain_text("Pick the adapter folder")
        await form.get_by_label("Adapter folder").set_input_files(folder)
        await expect(form.locator("#adapter-picked")).to_contain_text("adapter_model.safetensors")
        await expect(form.get_by_label("New model name")).to_have_value("sailor")
        await form.get_by_label("Base model").select_option("tiny:latest")
        await form.get_by_role("button", name="Upload and create").click()
        await expect(form.locator(".job.ok")).to_contain_text("success")
        await expect(row(ui, "sailor:latest").locator("td.parent")).to_have_text("tiny:latest")
        # the two files alone, picked without their folder, do as well
        await form.get_by_label("…or its files").set_input_files(
            [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
        )
        await form.get_by_label("New model name").fill("sailor2")
        await form.get_by_label("Base model").select_option("pirate:latest")  # an adapter
        await form.get_by_role("button", name="Upload and create").click()
        await expect(form.locator(".job.failed")).to_contain_text("itself an adapter")
        await form.get_by_label("Base model").select_option("tiny:latest")
        await form.get_by_role("button", name="Upload and create").click()
        await expect(row(ui, "sailor2:latest")).to_be_visible()


async def test_compress_with_a_scheme_and_its_quality_report(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        form = page.locator("#compress-form")
        await form.get_by_label("Scheme").select_option("int2")
        await expect(form.locator(".scheme-info .warn")).to_contain_text("experiments")
        await expect(form.get_by_label("group_size")).to_have_value("32")
        await form.get_by_label("Scheme").select_option("int8")
        await expect(form.locator(".scheme-info")).to_contain_text("per output channel")
        await expect(form.get_by_label("embedding")).to_have_value("int8")
        await form.get_by_label("Model to compress").select_option("tiny:latest")
        await expect(form.get_by_label("New model name")).to_have_value("tiny-int8")
        await form.get_by_role("button", name="Compress").click()
        job = form.locator(".job")
        await expect(job).to_have_class(re.compile(r"\bok\b"), timeout=60_000)
        await expect(job.locator(".progress-status")).to_have_text("success")
        assert await job.locator("progress").evaluate("p => p.value === p.max")
        new = row(ui, "tiny-int8:latest")
        await expect(new.locator("td").nth(3)).to_have_text("INT8")
        await expect(new.locator("td.parent")).to_have_text("tiny:latest")

        # a measured report (`ollama-compact eval`) is drawn against the parent's
        for name, ppl, size, parent in (
            ("tiny", 20.0, 4_000_000, None),
            ("tiny-int8", 21.0, 1_000_000, 20.0),
        ):
            record = ui.registry.get(name)
            write_eval(ui.registry, report(record, ppl, size, parent))
        await new.get_by_role("button").click()
        quality = page.locator("#model-details .quality")
        await expect(quality).to_contain_text("+5.0% vs tiny:latest")
        perplexity = quality.locator(".metric", has_text="Perplexity")
        await expect(perplexity.locator(".bar")).to_have_count(2)
        await expect(perplexity.locator(".bar.parent")).to_have_count(1)
        await expect(quality.locator(".metric", has_text="Size")).to_contain_text("4.0 MB")


def report(record, ppl: float, size: int, parent: float | None) -> EvalReport:
    return EvalReport(
        model=record.name.display(),
        digest=record.digest,
        measured_at="2026-01-01T00:00:00Z",
        device="cpu",
        dtype="float32",
        text="held-out.txt",
        text_sha256="0" * 64,
        tokens_scored=100,
        window=64,
        stride=64,
        perplexity=ppl,
        size_bytes=size,
        resident_bytes=size,
        slots=1,
        context=64,
        new_tokens=8,
        tokens_per_second_1=50.0,
        tokens_per_second_16=300.0,
        parent_model="tiny:latest" if parent else "",
        parent_perplexity=parent,
        perplexity_change=(ppl - parent) / parent if parent else None,
    )


def chat_lines(count: int) -> str:
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


async def test_finetune_shows_its_loss_curve(registry, tmp_path: Path) -> None:
    data = tmp_path / "colours.jsonl"
    data.write_text(chat_lines(8))
    async with ui_session(registry) as ui:
        page = ui.page
        await open_models(ui)
        form = page.locator("#finetune-form")
        await form.get_by_label("Base model").select_option("tiny:latest")
        await form.get_by_label("Training data").set_input_files(data)
        await form.get_by_label("New adapter model name").fill("blue")
        await form.get_by_label("Max steps").fill("-1")
        await form.get_by_role("button", name="Train", exact=True).click()
        await expect(form.locator(".form-error")).to_contain_text("max_steps must be")
        await form.get_by_label("Max steps").fill("3")
        await form.get_by_label("Learning rate").fill("0.01")
        await form.get_by_label("Rank").fill("4")
        await form.get_by_role("button", name="Train", exact=True).click()
        job = form.locator(".job")
        await expect(job).to_have_class(re.compile(r"\bok\b"), timeout=60_000)
        await expect(job.locator(".loss-chart svg.chart path.line")).to_have_count(1)
        await expect(row(ui, "blue:latest").locator("td.parent")).to_have_text("tiny:latest")
        training = page.locator("#model-details .training")  # the new model is shown
        await expect(training).to_contain_text("lora on tiny:latest: 3 steps")
        await expect(training.locator("svg.chart path.line")).to_have_count(1)

        # a long run stopped from the page adds nothing
        await form.get_by_label("New adapter model name").fill("endless")
        await form.get_by_label("Max steps").fill("1000000")
        await form.get_by_role("button", name="Train", exact=True).click()
        running = form.locator(".job").first
        await expect(running.locator(".progress-status")).to_contain_text("training: step")
        await running.get_by_role("button", name="Stop").click()
        await expect(running).to_have_class(re.compile(r"\bfailed\b"))
        await expect(running.locator(".progress-status")).to_have_text("failed: stopped")
        assert "endless:latest" not in await names(ui)


async def test_pull_from_the_hub_shows_progress(
    registry, tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf.co/... through the page, from a fake Hugging Face hub on loopback (tests/test_pull.py)."""
    import huggingface_hub.constants

    from tests.test_pull import FakeHub

    repo = tmp_path / "hub-repo"
    repo.mkdir()
    for path in tiny_models["llama"].iterdir():
        if path.is_file():
            (repo / path.name).write_bytes(path.read_bytes())
    with FakeHub({"org/tiny": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        async with ui_session(registry) as ui:
            page = ui.page
            await open_models(ui)
            pull = page.locator("#pull-form")
            await pull.get_by_label("Model to pull").fill("hf.co/org/tiny")
            await pull.get_by_role("button", name="Pull").click()
            await expect(pull.locator(".job.ok")).to_contain_text("success", timeout=60_000)
            assert await pull.locator(".job progress").evaluate("p => p.value === p.max")
            await expect(row(ui, "hf.co/org/tiny:latest")).to_be_visible()
            assert "hf.co/org/tiny:latest" in await names(ui)

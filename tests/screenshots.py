"""The README's screenshots of the web page, taken with the real default model (gemma3:270m)
in a scratch registry: a LoRA adapter fine-tuned through the page on Genesis (the live loss
curve), the base and the adapter compared side by side in Chat, the registry with the
adapter's training report, the Engine page under load, and the key prompt.

    .venv/bin/python -m tests.screenshots [docs/screenshots] [--only engine,key]

Run it on a quiet machine: the Engine page shows whatever else the CPU is doing.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.async_api import expect

from ollama_compact_server.jobs.default_model import ensure_default_model
from ollama_compact_server.registry.store import Registry
from tests.conftest import E2E_REGISTRY
from tests.test_compress_e2e import linked_registry
from tests.ui_support import ui_session

REPO = Path(__file__).resolve().parent.parent
GENESIS = REPO / "benchmarks" / "data" / "genesis_kjv.txt"


async def traffic(base: str, seconds: float, models: list[str]) -> None:
    """Eight clients asking ``models`` in turn for continuations for ``seconds``."""
    prompts = ["In the beginning", "And the earth was", "Now the serpent", "And Noah"]

    async def client(i: int, http: httpx.AsyncClient) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            body = {
                "model": models[i % len(models)],
                "prompt": prompts[i % len(prompts)],
                "stream": False,
                "options": {"num_predict": 48, "temperature": 0.7},
            }
            await http.post("/api/generate", json=body)

    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        await asyncio.gather(*(client(i, http) for i in range(8)))


async def take(folder: Path, only: set[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = Registry(E2E_REGISTRY)
    ensure_default_model(source)
    with tempfile.TemporaryDirectory() as scratch:
        registry = linked_registry(source, "gemma3:270m", Path(scratch) / "registry")
        async with ui_session(registry, width=1280, height=860) as ui:
            if only <= {"engine", "key"}:
                if "engine" in only:
                    await engine_shot(ui, folder, ["gemma3:270m"])
            else:
                await pages_shots(ui, folder)
    if "key" in only:
        await key_shot(source, folder)
    print(f"screenshots in {folder}")


async def pages_shots(ui, folder: Path) -> None:
    """Fine-tuning through the Models page, the adapter's report, Chat comparing."""
    page = ui.page
    # fine-tuning through the Models page, shot while the loss curve grows
    await ui.open("models")
    form = page.locator("#finetune-form")
    await form.get_by_label("Base model").select_option("gemma3:270m")
    await form.get_by_label("Training data").set_input_files(GENESIS)
    await form.get_by_label("New adapter model name").fill("genesis")
    await form.get_by_label("Max steps").fill("24")
    await form.get_by_label("Learning rate").fill("0.001")
    await form.get_by_role("button", name="Train", exact=True).click()
    await expect(form.locator(".job .progress-status")).to_contain_text("step 12", timeout=600_000)
    await form.scroll_into_view_if_needed()
    await form.screenshot(path=str(folder / "finetune.png"))
    await expect(form.locator(".job")).to_have_class("job ok", timeout=600_000)
    row = page.locator('#models-table tr[data-model="genesis:latest"]')
    await row.get_by_role("button").click()
    await expect(page.locator("#model-details .training")).to_be_visible()
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(folder / "models.png"), full_page=False)
    # the base and its new adapter side by side
    await ui.open("chat")
    await page.check("#chat-compare")
    await page.select_option("#chat-model-0", "gemma3:270m")
    await page.select_option("#chat-model-1", "genesis:latest")
    for name, value in (("temperature", "0"), ("num_predict", "60")):
        await page.fill(f"#chat-{name}", value)
        await page.dispatch_event(f"#chat-{name}", "change")
    await page.fill("#chat-input", "And God said unto Noah,")
    await page.press("#chat-input", "Enter")
    for k in (0, 1):
        stats = page.locator(f"#chat-transcript-{k} .msg.assistant .stats")
        await expect(stats).to_contain_text("tokens", timeout=300_000)
    await page.screenshot(path=str(folder / "chat.png"))
    await engine_shot(ui, folder, ["gemma3:270m", "genesis"])


async def engine_shot(ui, folder: Path, models: list[str]) -> None:
    """The Engine page under eight clients."""
    page = ui.page
    await ui.open("engine")
    await page.select_option("#engine-interval", "1")
    load = asyncio.create_task(traffic(ui.base, 40, models))
    await asyncio.sleep(36)
    await page.screenshot(path=str(folder / "engine.png"))
    await load


async def key_shot(source: Registry, folder: Path) -> None:
    """The key prompt, on a daemon that asks for one."""
    with tempfile.TemporaryDirectory() as scratch:
        registry = linked_registry(source, "gemma3:270m", Path(scratch) / "registry")
        async with ui_session(registry, width=900, height=560, api_key="secret") as ui:
            await ui.open("chat")
            await ui.page.locator("#key-dialog").wait_for(state="visible")
            await ui.page.screenshot(path=str(folder / "key.png"))
            await ui.page.fill("#key-input", "secret")
            await ui.page.press("#key-input", "Enter")
            await expect(ui.page.locator("#version")).to_contain_text("ollama-compact")


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = {"pages", "engine", "key"}
    if "--only" in args:
        at = args.index("--only")
        chosen = set(args[at + 1].split(","))
        del args[at : at + 2]
    asyncio.run(take(Path(args[0]) if args else REPO / "docs" / "screenshots", chosen))

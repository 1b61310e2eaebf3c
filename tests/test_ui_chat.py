"""The Chat page in a real browser: streamed replies equal to the API's own, stop frees the
engine, two models side by side, the conversation kept in the browser, Markdown shown
safely (model output never becomes markup), usable on a narrow screen and by keyboard."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.ui_support import UI, tiny_registry, ui_session

GREEDY = {"temperature": 0, "seed": 7, "num_predict": 24}


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]):
    return tiny_registry(tmp_path / "registry", tiny_models, tmp_path)


async def direct(ui: UI, model: str, text: str, options: dict) -> str:
    r = await ui.http.post(
        "/api/chat",
        json={
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "stream": False,
            "options": options,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["message"]["content"]


async def stored(ui: UI) -> dict:
    return json.loads(await ui.page.evaluate("localStorage.getItem('ocs-chat')"))


async def set_options(ui: UI, options: dict) -> None:
    for name, value in options.items():
        await ui.page.fill(f"#chat-{name}", str(value))
        await ui.page.dispatch_event(f"#chat-{name}", "change")


async def running(ui: UI) -> float:
    text = (await ui.http.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("ocs_running_sequences "))
    return float(line.split()[1])


async def test_chat_streams_the_same_reply_as_the_api(registry) -> None:
    async with ui_session(registry) as ui:
        await ui.open("chat")
        page = ui.page
        await expect(page.locator("#chat-model-0")).to_have_value("pirate:latest")  # first by name
        await page.select_option("#chat-model-0", "tiny:latest")
        await set_options(ui, GREEDY)
        await page.fill("#chat-input", "Hello there")
        await page.press("#chat-input", "Enter")  # Enter sends
        reply = page.locator("#chat-transcript-0 .msg.assistant")
        await expect(reply.locator(".stats")).to_contain_text("tokens/s")
        want = await direct(ui, "tiny", "Hello there", GREEDY)
        saved = await stored(ui)
        assert saved["panes"][0]["messages"][-1]["content"] == want
        assert (await reply.locator(".body").inner_text()).strip()
        await ui.shot("chat")
        # kept in the browser: a reload shows the conversation again
        await page.reload()
        await expect(page.locator("#chat-transcript-0 .msg.user .body")).to_have_text("Hello there")
        await expect(page.locator("#chat-transcript-0 .msg.assistant")).to_have_count(1)
        # a second turn sends the history
        await page.fill("#chat-input", "And again")
        await page.click("#chat-send")
        await expect(page.locator("#chat-transcript-0 .msg.assistant .stats")).to_have_count(2)
        await expect(
            page.locator("#chat-transcript-0 .msg.assistant .stats").nth(1)
        ).to_contain_text("tokens")
        await page.click("#chat-new")
        await expect(page.locator("#chat-transcript-0 .msg")).to_have_count(0)


async def test_stop_ends_the_stream_and_frees_the_engine(registry) -> None:
    async with ui_session(registry) as ui:
        await ui.open("chat")
        page = ui.page
        await page.select_option("#chat-model-0", "tiny:latest")
        await set_options(ui, {"temperature": 0.8, "num_predict": 1500})
        await page.fill("#chat-input", "Tell me a long story")
        await page.click("#chat-send")
        await expect(page.locator("#chat-stop")).to_be_enabled()
        await expect(page.locator("#chat-transcript-0 .msg.assistant .body")).not_to_have_text("")
        await page.click("#chat-stop")
        await expect(page.locator("#chat-transcript-0 .msg.assistant .stats")).to_have_text(
            "stopped"
        )
        await expect(page.locator("#chat-send")).to_be_enabled()
        for _ in range(100):  # the engine lets go of the sequence
            if await running(ui) == 0:
                break
            await asyncio.sleep(0.05)
        assert await running(ui) == 0
        kept = (await stored(ui))["panes"][0]["messages"][-1]
        assert kept["stats"] == "stopped" and kept["content"]  # the partial reply is kept
        # Escape stops too, and the next message still works
        await page.fill("#chat-input", "Again")
        await page.press("#chat-input", "Enter")
        await expect(page.locator("#chat-stop")).to_be_enabled()
        await page.press("#chat-input", "Escape")
        await expect(page.locator("#chat-transcript-0 .msg.assistant .stats").nth(1)).to_have_text(
            "stopped"
        )


async def test_compare_two_models_side_by_side(registry) -> None:
    async with ui_session(registry) as ui:
        await ui.open("chat")
        page = ui.page
        assert await page.is_hidden("#chat-pane-1")
        await page.check("#chat-compare")
        await expect(page.locator("#chat-pane-1")).to_be_visible()
        await page.select_option("#chat-model-0", "tiny:latest")
        await page.select_option("#chat-model-1", "pirate:latest")
        await set_options(ui, GREEDY)
        await page.fill("#chat-input", "Ahoy")
        await page.click("#chat-send")
        for k in (0, 1):
            await expect(
                page.locator(f"#chat-transcript-{k} .msg.assistant .stats")
            ).to_contain_text("tokens")
        panes = (await stored(ui))["panes"]
        base = await direct(ui, "tiny", "Ahoy", GREEDY)
        adapter = await direct(ui, "pirate", "Ahoy", GREEDY)
        assert base != adapter  # the comparison shows a difference...
        assert panes[0]["messages"][-1]["content"] == base  # ...and each side is its model's
        assert panes[1]["messages"][-1]["content"] == adapter
        assert panes[1]["messages"][-1]["model"] == "pirate:latest"
        await ui.shot("compare")


async def test_errors_are_shown_not_swallowed(registry) -> None:
    async with ui_session(registry) as ui:
        r = await ui.http.post("/api/copy", json={"source": "tiny", "destination": "gone"})
        assert r.status_code == 200
        await ui.open("chat")
        page = ui.page
        await page.select_option("#chat-model-0", "gone:latest")
        r = await ui.http.request("DELETE", "/api/delete", json={"model": "gone"})
        assert r.status_code == 200  # deleted behind the page's back
        await page.fill("#chat-input", "Hello")
        await page.click("#chat-send")
        failed = page.locator("#chat-transcript-0 .msg.assistant.failed")
        await expect(failed).to_contain_text("gone")
        await expect(failed).to_contain_text("not found")
        await expect(page.locator("#chat-send")).to_be_enabled()


MARKDOWN = """# Title

Some **bold**, *em*, `code` and [a link](https://example.com) and [bad](javascript:alert(1)).

<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">

```python
print("<b>hi</b>")
```

- one
- two

1. first
2. second

| a | b |
|---|---|
| 1 | 2 |

> quoted
"""


async def test_markdown_is_rendered_as_text_never_markup(registry) -> None:
    async with ui_session(registry) as ui:
        await ui.open("chat")
        page = ui.page
        result = await page.evaluate(
            """async (source) => {
                const { render } = await import('/ui/js/markdown.js');
                const box = document.createElement('div');
                box.append(render(source));
                document.body.append(box);
                await new Promise((r) => setTimeout(r, 200));
                return {
                    h: box.querySelector('h3')?.textContent,
                    strong: box.querySelector('strong')?.textContent,
                    em: box.querySelector('em')?.textContent,
                    code: box.querySelector('p code')?.textContent,
                    links: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
                    rel: box.querySelector('a')?.rel,
                    pre: box.querySelector('pre code')?.textContent,
                    lang: box.querySelector('pre .lang')?.textContent,
                    ul: box.querySelectorAll('ul li').length,
                    ol: box.querySelectorAll('ol li').length,
                    cells: [...box.querySelectorAll('td')].map((t) => t.textContent),
                    quote: box.querySelector('blockquote')?.textContent.trim(),
                    scripts: box.querySelectorAll('script, img').length,
                    text: box.textContent,
                    pwned: window.pwned ?? null,
                };
            }""",
            MARKDOWN,
        )
        assert result["h"] == "Title"
        assert result["strong"] == "bold" and result["em"] == "em" and result["code"] == "code"
        assert result["links"] == ["https://example.com"]  # javascript: stays text
        assert result["rel"] == "noopener noreferrer"
        assert result["pre"] == 'print("<b>hi</b>")' and result["lang"] == "python"
        assert result["ul"] == 2 and result["ol"] == 2
        assert result["cells"] == ["1", "2"]
        assert result["quote"] == "quoted"
        assert result["scripts"] == 0 and result["pwned"] is None
        assert "<script>window.pwned = 1</script>" in result["text"]
        # half a reply (an open fence while streaming) is still a code block
        partial = await page.evaluate(
            """async () => {
                const { render } = await import('/ui/js/markdown.js');
                const box = document.createElement('div');
                box.append(render('Look:\\n```js\\nlet x = 1'));
                const code = box.querySelector('pre code')?.textContent;
                return [code, box.querySelector('p')?.textContent];
            }"""
        )
        assert partial == ["let x = 1", "Look:"]


async def test_thinking_is_folded_and_narrow_screen_fits(registry) -> None:
    async with ui_session(registry, width=390, height=800) as ui:
        await ui.open("chat")
        page = ui.page
        conversation = {
            "system": "",
            "options": {},
            "think": True,
            "compare": True,
            "panes": [
                {
                    "model": "tiny:latest",
                    "messages": [
                        {"role": "user", "content": "Why?"},
                        {
                            "role": "assistant",
                            "model": "tiny:latest",
                            "content": "Because.",
                            "thinking": "Let me think about it.",
                        },
                    ],
                },
                {"model": "pirate:latest", "messages": []},
            ],
        }
        await page.evaluate(
            "(value) => localStorage.setItem('ocs-chat', value)", json.dumps(conversation)
        )
        await page.reload()
        thinking = page.locator("#chat-transcript-0 details.thinking")
        await expect(thinking).to_have_count(1)
        assert not await thinking.evaluate("d => d.open")  # folded
        await expect(thinking.locator("div")).to_be_hidden()
        await thinking.locator("summary").click()
        await expect(thinking.locator("div")).to_have_text("Let me think about it.")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width  # nothing wider than the phone
        await ui.shot("chat-narrow")


@pytest.mark.e2e
async def test_real_model_through_the_page(gemma_registry) -> None:
    """gemma3:270m, the default model, answers through the page as through the API."""
    options = {"temperature": 0, "num_predict": 16}
    question = "Write one sentence about the sea."
    async with ui_session(gemma_registry) as ui:
        await ui.open("chat")
        page = ui.page
        await page.select_option("#chat-model-0", "gemma3:270m")
        await set_options(ui, options)
        await page.fill("#chat-input", question)
        await page.press("#chat-input", "Enter")
        reply = page.locator("#chat-transcript-0 .msg.assistant")
        await expect(reply.locator(".stats")).to_contain_text("tokens/s", timeout=120_000)
        # asked again through the API, the prompt now cached: the same reply
        want = await direct(ui, "gemma3:270m", question, options)
        assert want.strip()
        assert (await stored(ui))["panes"][0]["messages"][-1]["content"] == want

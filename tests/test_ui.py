"""The web page's shell in a real browser (tests/ui_support.py): served at /ui with a
strict policy, public files but keyed data, the key asked for once and kept for the tab,
the daemon's own origin allowed to change things, no external resource anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from playwright.async_api import expect

from ollama_compact_server.api.ui import ASSETS, ROOT
from ollama_compact_server.app import create_app
from ollama_compact_server.settings import Settings
from tests.ui_support import tiny_registry, ui_session

KEY = "s3cret-key"


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]):
    return tiny_registry(tmp_path / "registry", tiny_models, tmp_path)


async def test_files_policy_and_root(tmp_path: Path) -> None:
    settings = Settings(models=tmp_path / "r", adapters=None, import_default=False)
    app = create_app(settings, engine=_NoEngine())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11434") as c:
        r = await c.get("/")
        assert r.text == "Ollama is running"  # the CLI's probe is unchanged
        r = await c.get("/ui")
        assert r.status_code == 308 and r.headers["location"] == "/ui/"
        r = await c.get("/ui/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert r.headers["x-content-type-options"] == "nosniff"
        r = await c.get("/ui/js/main.js")
        assert r.headers["content-type"].startswith("text/javascript")
        for bad in ("/ui/../app.py", "/ui/js/../../api/ui.py", "/ui/nothing.js", "/ui/%2e%2e/x"):
            assert (await c.get(bad)).status_code == 404, bad


class _NoEngine:
    def health(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


def test_every_file_is_served_and_nothing_external() -> None:
    on_disk = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()}
    assert on_disk == set(ASSETS)  # no file of the folder is left unserved (or unknown type)
    for name, asset in ASSETS.items():
        if not name.endswith((".html", ".js", ".css")):
            continue
        text = asset.body.decode()
        # offline: no other site's scripts, styles or fonts
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), name
        assert "@import url(http" not in text and "fonts.googleapis" not in text, name
        # model output and names go in as text, never as markup
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{name} uses {sink}"


async def test_shell_navigates_without_errors(registry) -> None:
    async with ui_session(registry) as ui:
        await ui.open()
        page = ui.page
        await page.wait_for_selector("#page-chat:not([hidden])")
        await page.click("nav a[data-page=models]")
        await page.wait_for_selector("#page-models:not([hidden])")
        assert await page.is_hidden("#page-chat")
        await page.click("nav a[data-page=engine]")
        await page.wait_for_selector("#page-engine:not([hidden])")
        await expect(page.locator("#version")).to_contain_text("ollama-compact")


async def test_key_asked_once_and_kept_for_the_tab(registry) -> None:
    async with ui_session(registry, api_key=KEY) as ui:
        r = await ui.http.get("/ui/app.css", headers={"Authorization": ""})
        assert r.status_code == 200  # the page's files are public...
        async with httpx.AsyncClient(base_url=ui.base) as bare:
            assert (await bare.get("/ui/api/schemes")).status_code == 401  # ...its data not
            assert (await bare.get("/api/tags")).status_code == 401
        await ui.open()
        page = ui.page
        dialog = page.locator("#key-dialog")
        await dialog.wait_for(state="visible")
        await page.fill("#key-input", "wrong")
        await page.press("#key-input", "Enter")  # keyboard only
        await page.wait_for_selector("#key-error:not([hidden])")
        await page.fill("#key-input", KEY)
        await page.press("#key-input", "Enter")
        await dialog.wait_for(state="hidden")
        await expect(page.locator("#version")).to_contain_text("ollama-compact")
        assert await page.evaluate("sessionStorage.getItem('ocs-api-key')") == KEY
        assert await page.evaluate("localStorage.getItem('ocs-api-key')") is None
        await page.reload()  # same tab: not asked again
        await expect(page.locator("#version")).to_contain_text("ollama-compact")
        assert not await dialog.is_visible()
        other = await page.context.new_page()  # another tab asks again
        await other.goto(f"{ui.base}/ui/")
        await other.locator("#key-dialog").wait_for(state="visible")
        await other.close()


async def test_same_origin_may_change_foreign_may_not(registry) -> None:
    async with ui_session(registry) as ui:
        own = {"Origin": ui.base}
        body = {"source": "tiny", "destination": "tiny-copy"}
        r = await ui.http.post("/api/copy", json=body, headers=own)
        assert r.status_code == 200, r.text
        # the same port by another name is another origin
        port = ui.base.rsplit(":", 1)[1]
        evil = {"Origin": f"http://evil.example:{port}"}
        r = await ui.http.post("/api/copy", json={**body, "destination": "x"}, headers=evil)
        assert r.status_code == 403
        r = await ui.http.post(
            "/api/copy",
            json={**body, "destination": "x"},
            headers={"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"},
        )
        assert r.status_code == 403  # a rebound name fails the Host check first


async def test_ui_json_routes(registry) -> None:
    async with ui_session(registry) as ui:
        schemes = (await ui.http.get("/ui/api/schemes")).json()["schemes"]
        names = {s["name"] for s in schemes}
        assert {"int8", "int4", "nf4"} <= names
        int4 = next(s for s in schemes if s["name"] == "int4")
        assert int4["options"]["group_size"]["choices"] == [32, 64, 128, 256]
        r = await ui.http.post(
            "/ui/api/modelfile",
            json={"modelfile": 'FROM tiny\nPARAMETER temperature 0.2\nSYSTEM "Be brief."'},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "from": "tiny",
            "system": "Be brief.",
            "parameters": {"temperature": 0.2},
        }
        for text, words in (
            ("FROM ./weights", "not a file"),
            ("FROM tiny\nADAPTER ./lora", "upload the adapter folder"),
            ("PARAMETER temperature 1", "FROM"),
            ("", "required"),
        ):
            r = await ui.http.post("/ui/api/modelfile", json={"modelfile": text})
            assert r.status_code == 400, text
            assert words in r.json()["error"], r.json()


def test_every_file_is_packaged() -> None:
    import fnmatch

    import tomllib

    project = tomllib.loads((ROOT.parent.parent / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["ollama_compact_server"]
    for name in ASSETS:
        path = f"ui/{name}"
        assert any(
            fnmatch.fnmatch(path, p) and p.count("/") == path.count("/") for p in patterns
        ), path


async def test_sha256_of_uploads_matches_hashlib(registry) -> None:
    """The page hashes uploads itself (crypto.subtle is missing on plain http by another
    name); its SHA-256 must be the digest /api/blobs checks."""
    import hashlib

    sizes = [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 70_000]
    async with ui_session(registry) as ui:
        await ui.open()
        got = await ui.page.evaluate(
            """async (sizes) => {
                const { Sha256, sha256Hex } = await import('/ui/js/sha256.js');
                const out = [];
                for (const n of sizes) {
                    const bytes = new Uint8Array(n).map((_, i) => (i * 7 + 3) & 255);
                    const h = new Sha256();
                    for (let i = 0; i < n; i += 13) h.update(bytes.subarray(i, i + 13));
                    out.push([h.hex(), await sha256Hex(new Blob([bytes]))]);
                }
                return out;
            }""",
            sizes,
        )
    for n, (chunked, whole) in zip(sizes, got, strict=True):
        want = hashlib.sha256(bytes((i * 7 + 3) & 255 for i in range(n))).hexdigest()
        assert chunked == want and whole == want, n

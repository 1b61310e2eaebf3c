"""`ollama-compact eval` on tiny models: sliding windows score every token once, the engine's
perplexity matches a plain transformers computation, reports are recorded beside the registry
without touching a digest, compared with the parent's, shown by /api/show and the CLI."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from ollama_compact_server.cli import main
from ollama_compact_server.evaluation import (
    EvalError,
    Options,
    evaluate,
    heldout_text,
    text_ids,
    windows,
)
from ollama_compact_server.jobs.create import CreateSpec, create_model
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
from ollama_compact_server.registry.evals import EVAL_DIR, eval_path, read_eval
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.names import ModelName
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import serve_app, tree_hash

MAX_TOKENS = 700  # three windows of the shipped text: fast on the tiny models


@pytest.mark.parametrize(
    ("n", "window", "stride"), [(0, 8, 4), (1, 8, 4), (2, 8, 4), (8, 8, 4), (23, 8, 3), (9, 8, 7)]
)
def test_windows_score_every_token_once(n: int, window: int, stride: int) -> None:
    spans = windows(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert end - begin <= window and begin < first <= end
        if begin > 0:  # after the first window, at least window - stride tokens of context
            assert first - begin >= window - stride
    with pytest.raises(ValueError):
        windows(10, 8, 8)


def test_shipped_text_is_large_enough_and_documented() -> None:
    text = heldout_text()
    assert 20_000 <= len(text.text.encode()) <= 60_000
    notes = Path(__file__).resolve().parent.parent / "ollama_compact_server/data/HELDOUT.md"
    assert "public domain" in notes.read_text()


@pytest.fixture
def tiny_registry(tmp_path: Path, tiny_models: dict[str, Path], tiny_adapter: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    create_model(
        registry,
        CreateSpec(name=ModelName.parse("pirate"), from_="tiny-llama", system="Arr."),
        lambda *a: None,
    )
    import_adapter_dir(registry, tiny_adapter, "lora", base="tiny-llama")
    return registry


def settings_for(registry: Registry) -> Settings:
    return Settings(models=registry.root, adapters=None, import_default=False, dtype="float32")


def reference_perplexity(registry: Registry, name: str) -> float:
    """The same windows scored by a plain transformers forward pass."""
    record = registry.get(name)
    model = load_causal_lm(registry, record, dtype=torch.float32)
    ids = text_ids(load_tokenizer(registry, record), heldout_text().text, MAX_TOKENS)
    assert len(ids) == MAX_TOKENS
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin, end, first in windows(len(ids)):
            logits = model(torch.tensor([ids[begin:end]])).logits[0].float()  # [T, V]
            logprobs = torch.log_softmax(logits, dim=-1)
            for position in range(first, end):
                nll -= logprobs[position - begin - 1, ids[position]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_transformers_and_is_recorded(tiny_registry: Registry) -> None:
    before = tiny_registry.get("tiny-llama")
    manifests = tree_hash(tiny_registry.root / "manifests")
    blobs = tree_hash(tiny_registry.root / "blobs")
    (report,) = evaluate(
        settings_for(tiny_registry), tiny_registry, "tiny-llama", Options(max_tokens=MAX_TOKENS)
    )
    assert report.tokens_scored == MAX_TOKENS - 1 and report.window == 512
    assert report.perplexity == pytest.approx(
        reference_perplexity(tiny_registry, "tiny-llama"), rel=1e-3
    )
    distinct = {before.manifest.config.digest: before.manifest.config.size}
    distinct.update({layer.digest: layer.size for layer in before.manifest.layers})
    assert report.size_bytes == sum(distinct.values())  # a blob used twice is stored once
    assert report.resident_bytes > 0 and report.slots == 16 and report.context == 1024
    assert report.tokens_per_second_1 > 0 and report.tokens_per_second_16 > 0
    assert report.parent_model == "" and report.perplexity_change is None
    # recorded beside the registry: no manifest or blob changed, the model's digest neither
    assert tree_hash(tiny_registry.root / "manifests") == manifests
    assert tree_hash(tiny_registry.root / "blobs") == blobs
    after = tiny_registry.get("tiny-llama")
    assert after.digest == before.digest
    assert read_eval(tiny_registry, after) == report
    # a copy (same manifest) shares the report; a derived model has none of its own yet
    tiny_registry.copy("tiny-llama", "tiny-copy")
    assert read_eval(tiny_registry, tiny_registry.get("tiny-copy")) == report
    assert read_eval(tiny_registry, tiny_registry.get("pirate")) is None


def test_change_from_parent(tiny_registry: Registry) -> None:
    settings = settings_for(tiny_registry)
    options = Options(max_tokens=300)
    (alone,) = evaluate(settings, tiny_registry, "pirate", options)
    assert alone.parent_model == "tiny-llama:latest" and alone.perplexity_change is None
    parent, child = evaluate(settings, tiny_registry, "pirate", options, with_parent=True)
    assert parent.model == "tiny-llama:latest" and child.model == "pirate:latest"
    # a system prompt does not change scoring of raw text: the same weights, the same numbers
    assert child.perplexity_change == pytest.approx(0.0, abs=1e-6)
    assert child.parent_perplexity == pytest.approx(parent.perplexity)
    # without --with-parent the recorded parent report is used, if measured the same way
    (again,) = evaluate(settings, tiny_registry, "pirate", options)
    assert again.perplexity_change == pytest.approx(0.0, abs=1e-6)
    (other,) = evaluate(settings, tiny_registry, "pirate", Options(max_tokens=200))
    assert other.perplexity_change is None  # not comparable: other tokens scored


def test_adapter_counts_its_base_and_changes_perplexity(tiny_registry: Registry) -> None:
    settings = settings_for(tiny_registry)
    base, adapter = evaluate(
        settings, tiny_registry, "lora", Options(max_tokens=300), with_parent=True
    )
    assert adapter.size_bytes > tiny_registry.get("lora").size
    assert adapter.size_bytes == pytest.approx(
        base.size_bytes + tiny_registry.get("lora").size, rel=0.01
    )
    assert adapter.perplexity_change is not None and adapter.perplexity_change != 0


def test_reports_of_other_or_gone_manifests_are_ignored_and_pruned(
    tiny_registry: Registry,
) -> None:
    settings = settings_for(tiny_registry)
    evaluate(settings, tiny_registry, "pirate", Options(max_tokens=100))
    record = tiny_registry.get("pirate")
    path = eval_path(tiny_registry, record.digest)
    path.write_text("{not json")
    assert read_eval(tiny_registry, record) is None
    path.write_text("x" * (1 << 17))
    assert read_eval(tiny_registry, record) is None
    tiny_registry.delete("pirate")
    evaluate(settings, tiny_registry, "tiny-llama", Options(max_tokens=100))
    left = {p.name for p in (tiny_registry.root / EVAL_DIR).iterdir()}
    assert left == {eval_path(tiny_registry, tiny_registry.get("tiny-llama").digest).name}
    with pytest.raises(ValueError):
        eval_path(tiny_registry, "../../etc")


def test_errors(tiny_registry: Registry, tmp_path: Path) -> None:
    settings = settings_for(tiny_registry)
    with pytest.raises(EvalError, match="no parent"):
        evaluate(settings, tiny_registry, "tiny-llama", Options(), with_parent=True)
    with pytest.raises(EvalError, match="cannot read"):
        evaluate(settings, tiny_registry, "tiny-llama", Options(text=tmp_path / "missing.txt"))
    (tmp_path / "one.txt").write_text("")
    with pytest.raises(EvalError, match="too short"):
        evaluate(settings, tiny_registry, "tiny-llama", Options(text=tmp_path / "one.txt"))


async def test_show_includes_the_report(tiny_registry: Registry) -> None:
    async with serve_app(tiny_registry) as served:
        info = (await served.raw.post("/api/show", json={"model": "pirate"})).json()
        assert not any(key.startswith("ocs.eval.") for key in info["model_info"])
    await asyncio.to_thread(
        evaluate,
        settings_for(tiny_registry),
        tiny_registry,
        "pirate",
        Options(max_tokens=200),
        True,
    )
    async with serve_app(tiny_registry) as served:
        shown = await served.ollama.show("pirate")
        info = shown.modelinfo
        report = read_eval(tiny_registry, tiny_registry.get("pirate"))
        assert report is not None
        assert info["ocs.eval.perplexity"] == pytest.approx(report.perplexity, rel=1e-4)
        assert info["ocs.eval.parent_model"] == "tiny-llama:latest"
        assert info["ocs.eval.perplexity_change"] == pytest.approx(0.0, abs=1e-5)
        assert info["ocs.eval.size_bytes"] == report.size_bytes
        assert info["ocs.eval.tokens_per_second_16"] > 0


def test_cli(tiny_registry: Registry, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = str(tiny_registry.root)
    code = main(
        [
            "eval",
            "pirate",
            "--models",
            root,
            "--dtype",
            "float32",
            "--max-tokens",
            "150",
            "--with-parent",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tiny-llama:latest" in out and "pirate:latest" in out
    assert "perplexity" in out and "+0.0% vs tiny-llama:latest" in out
    assert "tokens/s, 16 streams" in out and "size on disk" in out
    (tmp_path / "mine.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code = main(["eval", "tiny-llama", "--models", root, "--text", str(tmp_path / "mine.txt")])
    assert code == 0 and "mine.txt" in capsys.readouterr().out
    assert main(["eval", "missing", "--models", root]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "pirate", "--models", root, "--max-tokens", "1"]) == 2


@pytest.mark.e2e
def test_gemma_eval_numbers_are_sane(gemma_registry: Registry) -> None:
    """gemma3:270m through the real engine on 599 tokens of the held-out text (two
    two windows), without recording anything in the shared test registry."""
    settings = Settings(models=gemma_registry.root, adapters=None, import_default=False)
    (report,) = evaluate(
        settings,
        gemma_registry,
        "gemma3:270m",
        Options(max_tokens=600, new_tokens=16),
        save=False,
    )
    record = gemma_registry.get("gemma3:270m")
    assert report.tokens_scored == 599 and report.size_bytes >= record.size * 0.99
    assert 2 < report.perplexity < 100  # a real model on English prose (random: ~262k)
    assert 300 << 20 < report.resident_bytes < 3 << 30
    assert report.tokens_per_second_16 > report.tokens_per_second_1 > 0
    assert read_eval(gemma_registry, record) is None


def test_show_command_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    """`ollama-compact show` prints an Evaluation section from the ocs.eval.* keys."""
    import argparse

    from ollama_compact_server.commands import cmd_show

    info = {
        "details": {"family": "llama", "parameter_size": "1M"},
        "model_info": {
            "general.architecture": "llama",
            "ocs.eval.perplexity": 12.3456,
            "ocs.eval.perplexity_change": 0.0412,
            "ocs.eval.parent_model": "base:latest",
            "ocs.eval.size_bytes": 2_500_000_000,
            "ocs.eval.resident_bytes": 900_000_000,
            "ocs.eval.tokens_per_second_1": 20.5,
            "ocs.eval.tokens_per_second_16": 190.25,
        },
    }

    class Answer:
        def json(self) -> dict:
            return info

    class Client:
        def request(self, method: str, path: str, body: object = None) -> Answer:
            return Answer()

    flags = dict.fromkeys(("license", "modelfile", "parameters", "system", "template"), False)
    cmd_show(Client(), argparse.Namespace(model="m", **flags))  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "Evaluation" in out and "12.346 (+4.1% vs base:latest)" in out
    assert "2.5 GB" in out and "900.0 MB" in out and "190.25" in out


def test_held_out_texts_share_nothing_with_the_calibration_text() -> None:
    """Perplexity on text the compressor calibrated on would flatter it: no sequence of eight
    words of the calibration text may appear in the shipped held-out text or in the
    benchmark's."""
    import re
    from importlib import resources

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}

    data = resources.files("ollama_compact_server") / "data"
    calibration = grams((data / "calibration.txt").read_text(encoding="utf-8"))
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "heldout.txt"
    for text in ((data / "heldout_en.txt").read_text(encoding="utf-8"), bench.read_text()):
        shared = calibration & grams(text)
        assert not shared, sorted(" ".join(g) for g in shared)[:5]

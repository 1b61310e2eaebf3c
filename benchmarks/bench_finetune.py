"""Fine-tuning here, measured side by side in one run (issue 14):

1. **throughput**: our training loop against plain peft + transformers' ``Trainer`` on the
   same float32 model (``gemma3:270m`` expanded from its GGUF grid), the same LoRA (rank 16,
   alpha 32, every attention and MLP projection), the same tokenized examples, batch size
   and sequence length, one epoch each, alternating for ``--rounds``; tokens/s counts the
   tokens of every example seen (padding aside). Two data sets: **instructions** (a
   passage and its continuation, rendered with the model's chat template; the loss on the
   answer only) and **text** (plain 256-token windows, every token learnt).
2. **quality**: a LoRA adapter trained through the real job (``jobs.finetune``, as
   ``ollama-compact finetune`` runs it) on Genesis 1-9 (King James Version, public domain,
   ``benchmarks/data/genesis_kjv.txt``) as plain text in windows of ``--max-length`` (512,
   the window the perplexity is measured in) for ``--epochs`` (3) at ``--lr`` (1e-3), and
   its perplexity on the held-out chapters 10-12 measured through the serving engine (the
   adapter as it serves), against the base's; then the same on the base compressed to
   int4 (QLoRA: the base stays int4).
3. **serving**: 16 requests spread over a LoRA, a DoRA and an IA3 adapter in one batch,
   against the same 16 requests all on the LoRA adapter.

Run from the repository root::

    .venv/bin/python benchmarks/bench_finetune.py           # about 35 minutes on 2 cores
    .venv/bin/python benchmarks/bench_finetune.py --parts quality --bases f32
    .venv/bin/python benchmarks/bench_finetune.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import on_fresh_thread, open_registry, say

GENESIS = Path(__file__).resolve().parent / "data" / "genesis_kjv.txt"
DATA = Path(os.environ.get("OCS_BENCH_TEXT", GENESIS))  # another text in the same format
TRAIN_CHAPTERS = range(1, 10)
HELDOUT_CHAPTERS = range(10, 13)


def chapters(numbers: range) -> str:
    keep = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        head = line.split(" ", 1)[0]
        if ":" in head and head.split(":")[0].isdigit() and int(head.split(":")[0]) in numbers:
            keep.append(line)
    return "\n".join(keep) + "\n"


def instructions(text: str) -> list[list[dict[str, str]]]:
    """A passage of four verses and the next four as its continuation."""
    verses = text.splitlines()
    out = []
    for start in range(0, len(verses) - 8, 4):
        out.append(
            [
                {"role": "user", "content": "Continue:\n" + "\n".join(verses[start : start + 4])},
                {"role": "assistant", "content": "\n".join(verses[start + 4 : start + 8])},
            ]
        )
    return out


# ------------------------------------------------------------------------------ setup


def prepare(registry: Any, model: str, scratch: Path, int4: bool) -> Any:
    """A scratch registry holding the model's float expansion (and its int4 compression)."""
    from ollama_compact_server.modeling.loader import load_causal_lm, model_dir
    from ollama_compact_server.registry.importers import import_hf_dir
    from ollama_compact_server.registry.store import Registry

    local = Registry(scratch / "registry")
    record = registry.get(model)
    folder = scratch / "float"
    model_obj = load_causal_lm(registry, record, torch.float32, dequantize=True)
    model_obj.save_pretrained(folder)
    with model_dir(registry, record) as directory:
        for item in directory.iterdir():
            if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
                (folder / item.name).write_bytes(item.read_bytes())
    del model_obj
    import_hf_dir(  # with the registry's template, system prompt and defaults (the GGUF's)
        local,
        folder,
        "base-f32",
        template=registry.template(record) or None,
        system=registry.system(record) or None,
        params=registry.params(record) or None,
    )
    if int4:
        from ollama_compact_server.jobs.compressing import compress_registry_model

        say("compressing the float copy to int4")
        compress_registry_model(local, "base-f32", "base-int4", "int4")
    return local


def tokenized(local: Any, examples: Any, max_length: int) -> list[Any]:
    from ollama_compact_server.modeling.loader import load_tokenizer
    from ollama_compact_server.training.data import Encoder, Example, template_renderer

    record = local.get("base-f32")
    tokenizer = load_tokenizer(local, record)
    template = local.template(record)
    encoder = Encoder(
        tokenizer, template_renderer(template, tokenizer) if template else None, max_length
    )
    out = []
    for example in examples:
        if isinstance(example, str):
            out += encoder.encode(Example("bench", text=example))
        else:
            out += encoder.encode(Example("bench", messages=example))
    return out


# ------------------------------------------------------------------------------ 1. throughput


def params(max_steps: int, lr: float = 2e-4) -> Any:
    from ollama_compact_server.training.params import check_params

    return check_params(
        {
            "rank": 16,
            "alpha": 32,
            "dropout": 0.05,
            "batch_size": 4,
            "max_steps": max_steps,
            "learning_rate": lr,
            "eval_split": 0,
            "max_length": 256,
        }
    )


def ours_epoch(local: Any, items: list[Any], pad: int) -> tuple[float, int]:
    """One epoch of our loop at its default precision (``auto``: bfloat16 where the CPU
    multiplies it natively, as the job runs)."""
    from ollama_compact_server.jobs.finetune import training_dtype
    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.training import loop

    device = torch.device("cpu")
    dtype = training_dtype("auto", device)
    model = load_causal_lm(local, local.get("base-f32"), dtype)
    steps = math.ceil(len(items) / 4)
    peft_model = loop.attach_adapter(model, params(steps), compressed=False)
    run = loop.Run(peft_model, params(steps), items, pad, device, {}, dtype)
    started = time.perf_counter()
    state = run.run(lambda _: None, threading.Event())
    return time.perf_counter() - started, state.tokens


def trainer_epoch(
    local: Any, items: list[Any], pad: int, scratch: Path, bf16: bool
) -> tuple[float, int]:
    """One epoch of plain peft + Trainer: float32 as it comes, or with ``bf16=True``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.training.params import LORA_TARGETS

    model = load_causal_lm(local, local.get("base-f32"), torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        ),
    )
    seen = [0]

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        seen[0] += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=2e-4,
        warmup_steps=int(0.03 * math.ceil(len(items) / 4)),  # ours: warmup_ratio 0.03
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        bf16=bf16,
    )
    dataset = [{"input_ids": t.ids, "labels": t.labels} for t in items]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, seen[0]


def throughput(local: Any, rounds: int, scratch: Path, quick: bool) -> list[str]:
    from ollama_compact_server.jobs.finetune import training_dtype
    from ollama_compact_server.modeling.loader import load_tokenizer

    precision = str(training_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    tokenizer = load_tokenizer(local, local.get("base-f32"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    text = chapters(TRAIN_CHAPTERS)
    sets = {
        "instructions": tokenized(local, instructions(text), 256),
        "text": tokenized(local, [text], 256),
    }
    rows = []
    for label, items in sets.items():
        items = items[:16] if quick else items[:48]
        best: dict[str, float] = {}
        for r in range(rounds):
            for system in ("ours", "trainer", "trainer-bf16"):
                if system == "ours":
                    seconds, tokens = on_fresh_thread(ours_epoch, local, items, pad)
                else:
                    bf16 = system == "trainer-bf16"
                    seconds, tokens = on_fresh_thread(
                        trainer_epoch, local, items, pad, scratch, bf16
                    )
                speed = tokens / seconds
                say(f"{label} round {r + 1}: {system} {speed:.0f} tokens/s ({tokens} tokens)")
                best[system] = max(best.get(system, 0.0), speed)
        rows.append(
            f"| {label} ({len(items)} examples) | {best['ours']:.0f} | {best['trainer']:.0f} "
            f"| {best['trainer-bf16']:.0f} | {best['ours'] / best['trainer']:.2f}x "
            f"| {best['ours'] / best['trainer-bf16']:.2f}x |"
        )
    return [
        f"| data | ours ({precision}) tokens/s | Trainer float32 | Trainer bf16=True "
        "| ours / Trainer | ours / Trainer bf16 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


# ------------------------------------------------------------------------------ 2. quality


def perplexities(local: Any, names: list[str], text: str) -> dict[str, float]:
    """Each model's perplexity on ``text``, measured through the serving engine."""
    from ollama_compact_server.app import build_engine
    from ollama_compact_server.evaluation import STRIDE, WINDOW, eval_settings, perplexity, text_ids
    from ollama_compact_server.modeling.loader import load_tokenizer
    from ollama_compact_server.settings import Settings

    settings = eval_settings(
        Settings(models=local.root, adapters=None, import_default=False, dtype="float32")
    )
    engine = build_engine(settings, local)
    tokenizer = load_tokenizer(local, local.get("base-f32"))
    ids = text_ids(tokenizer, text, None)

    async def run() -> dict[str, float]:
        out = {}
        for name in names:
            await engine.load(name, keep_alive=None)
            out[name], _ = await perplexity(engine, name, ids, WINDOW, STRIDE)
            engine.unload(name)
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.close()


class Reporter:
    """Prints a training step every 30 seconds."""

    def __init__(self, name: str) -> None:
        self.name, self.last = name, 0.0

    def __call__(self, item: dict[str, Any]) -> None:
        if item.get("status") == "training" and time.perf_counter() - self.last > 30:
            self.last = time.perf_counter()
            say(f"{self.name}: step {item['completed']}/{item['total']} loss {item['loss']}")


def quality(local: Any, scratch: Path, args: argparse.Namespace, bases: list[str]) -> list[str]:
    from ollama_compact_server.jobs.finetune import FinetuneSpec, finetune
    from ollama_compact_server.registry.evals import read_training
    from ollama_compact_server.training.params import check_params

    train = scratch / "genesis-1-9.txt"
    train.write_text(chapters(TRAIN_CHAPTERS))
    heldout = chapters(HELDOUT_CHAPTERS)
    rows = []
    for base in bases:
        name = f"{base}-genesis"
        options = {
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "eval_split": 0.1,
        }
        if args.quick:
            options["max_steps"] = 2
        spec = FinetuneSpec(
            base=base, name=name, data=train, format="text", params=check_params(options)
        )
        started = time.perf_counter()
        record = on_fresh_thread(finetune, local, spec, Reporter(name))
        minutes = (time.perf_counter() - started) / 60
        report = read_training(local, record) or {}
        ppl = perplexities(local, [base, name], heldout)
        change = ppl[name] / ppl[base] - 1
        say(f"{name}: held-out perplexity {ppl[base]:.2f} -> {ppl[name]:.2f} ({change:+.1%})")
        rows.append(
            f"| {base.removeprefix('base-')} | {report.get('steps')} steps, {minutes:.1f} min, "
            f"{report.get('tokens_per_second')} tok/s | {ppl[base]:.2f} | {ppl[name]:.2f} "
            f"| {100 * change:+.1f}% |"
        )
    return [
        "| base | training | held-out perplexity, base | with the adapter | change |",
        "|---|---|---|---|---|",
        *rows,
    ]


# ------------------------------------------------------------------------------ 3. serving


def serving(local: Any, scratch: Path, rounds: int, new_tokens: int) -> list[str]:
    from bench_lora import start_engine, timed
    from peft import IA3Config, LoraConfig, get_peft_model

    from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
    from ollama_compact_server.registry.importers import import_adapter_dir
    from ollama_compact_server.training.params import LORA_TARGETS

    generator = torch.Generator().manual_seed(0)
    configs = {
        "lora": LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS)),
        "dora": LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS), use_dora=True),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    }
    for kind, config in configs.items():
        model = load_causal_lm(local, local.get("base-f32"), torch.float32)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                elif "ia3_l" in pname:
                    param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.1)
        out = scratch / f"serve-{kind}"
        peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        import_adapter_dir(local, out, f"serve-{kind}", "base-f32")
    tokenizer = load_tokenizer(local, local.get("base-f32"))
    prompts = [
        tokenizer(f"In the beginning {i}", add_special_tokens=True)["input_ids"] for i in range(16)
    ]
    mixed = [(f"serve-{('lora', 'dora', 'ia3')[i % 3]}", p) for i, p in enumerate(prompts)]
    single = [("serve-lora", p) for p in prompts]
    engine = start_engine(local, torch.float32, slots=16, max_loras=4)
    best = {"mixed": 0.0, "one": 0.0}
    try:

        async def run() -> None:
            await timed(engine, mixed[:4], 4, "warm")
            for r in range(rounds):
                for label, jobs in (("mixed", mixed), ("one", single)):
                    _, speed = await timed(engine, jobs, new_tokens, f"{label}{r}")
                    say(f"serving round {r + 1}: {label} {speed:.1f} tokens/s")
                    best[label] = max(best[label], speed)

        asyncio.run(run())
    finally:
        engine.close()
    return [
        "| 16 requests | tokens/s | vs one LoRA |",
        "|---|---|---|",
        f"| one LoRA adapter | {best['one']:.1f} | 1.00x |",
        f"| LoRA + DoRA + IA3 mixed | {best['mixed']:.1f} | {best['mixed'] / best['one']:.2f}x |",
    ]


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3.0, help="quality runs' epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="quality runs' learning rate")
    parser.add_argument("--batch-size", type=int, default=4, help="quality runs' batch size")
    parser.add_argument(
        "--max-length", type=int, default=512, help="quality runs' window (the eval's)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--parts", default="throughput,quality,serving", help="which parts to run, in order"
    )
    parser.add_argument(
        "--bases", default="f32,int4", help="the quality runs' bases: f32 and / or int4"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    registry = open_registry(args.registry, args.model)
    out = [
        f"`{shlex.join(['python', 'benchmarks/bench_finetune.py', *(argv or sys.argv[1:])])}`, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="ocs-bench-ft-") as scratch_name:
        scratch = Path(scratch_name)
        say("preparing the float expansion of the model")
        int4 = "quality" in parts and "int4" in args.bases
        local = on_fresh_thread(prepare, registry, args.model, scratch, int4)
        if "throughput" in parts:
            out += ["Training throughput, one epoch, LoRA r16:", ""]
            out += throughput(local, 1 if args.quick else args.rounds, scratch, args.quick)
            out.append("")
        if "quality" in parts:
            out += ["Held-out perplexity (Genesis 10-12), through the serving engine:", ""]
            bases = [f"base-{b.strip()}" for b in args.bases.split(",") if b.strip()]
            out += quality(local, scratch, args, bases)
            out.append("")
        if "serving" in parts:
            out += ["Serving adapters of three kinds in one batch:", ""]
            new_tokens = 8 if args.quick else args.new_tokens
            out += serving(local, scratch, 1 if args.quick else args.rounds, new_tokens)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

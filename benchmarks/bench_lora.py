"""Many LoRA adapters in one batch: our engine against itself and against peft, in one run.

On the real ``gemma3:270m`` (copied into a scratch registry from ``--registry``), with
``--adapters`` (default 8) random rank-``--rank`` (16) adapters on every attention and MLP
projection, imported into the registry the way users import theirs, and served through the
real registry path (digest-checked files, loaded beside the running batch):

1. **mixed**: ``--requests`` (16) concurrent requests, two per adapter, ``--new-tokens`` (64);
2. **one adapter**: the same 16 requests all on the first adapter;
3. **base, adapters resident** vs **base, no adapters**: the 16 requests on the bare base
   model after the adapters have been used, and in a fresh engine that never saw one;
4. **peft, switching**: peft's ``PeftModel`` holding the same adapters serves the same
   mixed requests (all of them unless ``--peft-requests`` takes a sample: two requests
   for each of a few adapters) one after another, calling ``set_adapter`` before each
   (batch size 1), and, as a stronger baseline, grouped by adapter (``set_adapter`` once
   per group, one batch); HF ``generate`` of the bare base on the same requests is printed
   for reference. peft runs between the engine runs of every round, so all systems see the
   same machine load; every figure is the best of ``--rounds``, printed beside the median;
5. **hot load**: the time to read an adapter from the registry into host memory (p50) and
   to write it into a device slot (p50).

Every request is greedy and produces exactly ``--new-tokens`` tokens (no end-of-sequence
ids; HF with ``min_new_tokens``). ``= peft`` counts the mixed-batch requests whose tokens
equal peft's sequential output for the same adapter and prompt.

Run from the repository root::

    .venv/bin/python benchmarks/bench_lora.py            # peft serving all 16 is the slow part
    .venv/bin/python benchmarks/bench_lora.py --peft-requests 4   # peft on a sample of 4
    .venv/bin/python benchmarks/bench_lora.py --quick    # smoke run (2 adapters, 4 requests)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import STORY_OPENINGS, engine_round, open_registry, say

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(registry: Any, base: str, count: int, rank: int, scratch: Path) -> list[str]:
    """Random rank-``rank`` PEFT adapters for ``base``, saved and imported like a user's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ollama_compact_server.modeling.loader import model_dir
    from ollama_compact_server.registry.importers import import_adapter_dir

    record = registry.get(base)
    with model_dir(registry, record) as directory:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    names = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=TARGETS,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        out = scratch / f"adapter-{i}"
        peft_model.save_pretrained(str(out), safe_serialization=True)
        name = f"bench-lora-{i}"
        import_adapter_dir(registry, out, name, base)
        names.append(name)
    return names


def start_engine(registry: Any, dtype: torch.dtype, slots: int, max_loras: int) -> Any:
    from ollama_compact_server.engine.config import EngineConfig, ModelSource
    from ollama_compact_server.engine.local import LocalEngine
    from ollama_compact_server.engine.loop import DeviceLoop
    from ollama_compact_server.engine.provider import RegistryProvider

    provider = RegistryProvider(registry, torch.device("cpu"), dtype)

    def provide(name: str) -> Any:
        loaded = provider(name)
        loaded.stop_ids = set()  # every request generates exactly new_tokens tokens
        return loaded

    config = EngineConfig(
        device=torch.device("cpu"),
        dtype=dtype,
        slots=slots,
        capacity=512,
        prefill_chunk=256,
        max_loras=max_loras,
    )
    models = ModelSource(provide, resolve=provider.resolve, load_adapter=provider.load_adapter)
    loop = DeviceLoop(config, models)
    loop.start()
    return LocalEngine(loop)


async def timed(engine: Any, jobs: list[tuple[str, list[int]]], new_tokens: int, tag: str):
    """All jobs at once (model, prompt); returns outputs and tokens/s."""
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            engine_round(engine, model, [prompt], 1, new_tokens, f"{tag}{i}")
            for i, (model, prompt) in enumerate(jobs)
        )
    )
    seconds = time.perf_counter() - started
    outputs = [r[0][0] for r in results]
    return outputs, sum(len(o) for o in outputs) / seconds


class PeftServer:
    """peft's PeftModel holding every adapter, serving requests the way a peft-based server
    does: set_adapter, then generate (one request at a time, or a group of one adapter's
    requests as a left-padded batch). ``base`` is HF generate with the adapters disabled."""

    def __init__(
        self,
        registry: Any,
        base: str,
        names: list[str],
        dtype: torch.dtype,
        new_tokens: int,
        pad_id: int,
    ) -> None:
        from peft import PeftModel

        from ollama_compact_server.modeling.loader import load_causal_lm, model_dir
        from ollama_compact_server.registry.manifest import MT_ADAPTER_FILE

        model = load_causal_lm(registry, registry.get(base), dtype=dtype)
        peft_model: Any = None
        for name in names:
            with model_dir(registry, registry.get(name), MT_ADAPTER_FILE) as directory:
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, directory, adapter_name=name)
                else:
                    peft_model.load_adapter(directory, adapter_name=name)
        self.model = peft_model.eval()
        self.pad_id = pad_id
        self.kwargs = {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "repetition_penalty": 1.0,
            "pad_token_id": pad_id,
        }

    @torch.inference_mode()
    def sequential(self, jobs: list[tuple[str, list[int]]]) -> tuple[list[list[int]], float]:
        outputs = []
        started = time.perf_counter()
        for model_name, prompt in jobs:
            self.model.set_adapter(model_name)
            out = self.model.generate(input_ids=torch.tensor([prompt]), **self.kwargs)
            outputs.append(out[0, len(prompt) :].tolist())
        return outputs, sum(len(o) for o in outputs) / (time.perf_counter() - started)

    @torch.inference_mode()
    def base(self, prompts: list[list[int]]) -> float:
        tokens = 0
        started = time.perf_counter()
        with self.model.disable_adapter():
            for prompt in prompts:
                out = self.model.generate(input_ids=torch.tensor([prompt]), **self.kwargs)
                tokens += out.shape[1] - len(prompt)
        return tokens / (time.perf_counter() - started)

    @torch.inference_mode()
    def grouped(self, jobs: list[tuple[str, list[int]]]) -> float:
        groups: dict[str, list[list[int]]] = {}
        for model_name, prompt in jobs:
            groups.setdefault(model_name, []).append(prompt)
        tokens = 0
        started = time.perf_counter()
        for model_name, prompts in groups.items():
            self.model.set_adapter(model_name)
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self.kwargs)
            tokens += out[:, width:].numel()
        return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=2, help="every figure: the best and the median of N"
    )
    parser.add_argument(
        "--peft-requests",
        type=int,
        default=None,
        help="peft serves a sample of N of the mixed requests per round (default: all)",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.new_tokens, args.rounds = 2, 4, 16, 1
    if args.peft_requests is not None and args.peft_requests < 1:
        parser.error("--peft-requests must be at least 1")

    from ollama_compact_server.engine.device import dtype_name, resolve_dtype
    from ollama_compact_server.modeling.loader import model_dir
    from ollama_compact_server.registry.importers import import_hf_dir
    from ollama_compact_server.registry.store import Registry

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    source = open_registry(args.registry, args.model)
    with tempfile.TemporaryDirectory(prefix="ocs-bench-lora-") as scratch_dir:
        scratch = Path(scratch_dir)
        registry = Registry(scratch / "registry")
        say(f"copying {args.model} into a scratch registry")
        with model_dir(source, source.get(args.model)) as directory:
            base = import_hf_dir(registry, directory, args.model).name.display()
        say(f"making {args.adapters} random rank-{args.rank} adapters")
        names = make_adapters(registry, base, args.adapters, args.rank, scratch)
        from transformers import AutoTokenizer

        with model_dir(registry, registry.get(base)) as directory:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        prompts = [tokenizer(t)["input_ids"] for t in STORY_OPENINGS]
        n = args.requests
        mixed_jobs = [(names[i % len(names)], prompts[i % len(prompts)]) for i in range(n)]
        one_jobs = [(names[0], prompts[i % len(prompts)]) for i in range(n)]
        base_jobs = [(base, prompts[i % len(prompts)]) for i in range(n)]
        # peft serves the same requests: all of them, or a sample of two requests for each
        # of a few adapters (so its grouped baseline still batches); indices into mixed_jobs
        if args.peft_requests is None or args.peft_requests >= n:
            sample_at = list(range(n))
        else:
            pairs = {m for m, _ in mixed_jobs[: max(1, args.peft_requests // 2)]}
            sample_at = [i for i, j in enumerate(mixed_jobs) if j[0] in pairs]
            sample_at = sample_at[: args.peft_requests]
        sample = [mixed_jobs[i] for i in sample_at]

        async def ours() -> dict[str, Any]:
            """Two engines side by side: one that has every adapter resident, one that never
            saw an adapter; their runs interleave. Keeps each label's best (with its
            outputs) and every round's rate (found[label, "rates"])."""
            found: dict[Any, Any] = {}

            def keep(label: str, outputs: Any, rate: float) -> None:
                found.setdefault((label, "rates"), []).append(rate)
                if label not in found or rate > found[label][1]:
                    found[label] = (outputs, rate)

            with_adapters = start_engine(registry, dtype, n, max_loras=len(names))
            without = start_engine(registry, dtype, n, max_loras=len(names))
            try:
                warm = [(base, prompts[0][:4]), *((name, prompts[0][:4]) for name in names)]
                await timed(with_adapters, warm, 2, "warm")  # the base and every adapter
                await timed(without, [(base, prompts[0][:4])], 2, "warm")
                runs = (
                    ("base, adapters resident", with_adapters, base_jobs),
                    ("mixed", with_adapters, mixed_jobs),
                    ("one adapter", with_adapters, one_jobs),
                    ("base, no adapters", without, base_jobs),
                )
                peft.sequential(sample[:1])  # warm-up
                for round_ in range(args.rounds):
                    for label, engine, jobs in runs:
                        say(f"engine: {label} (round {round_ + 1})")
                        outputs, rate = await timed(engine, jobs, args.new_tokens, label[:4])
                        say(f"  {rate:.1f} tok/s")
                        keep(label, outputs, rate)
                    say(f"peft: set_adapter per request, {len(sample)} requests")
                    outputs, rate = peft.sequential(sample)
                    say(f"  {rate:.1f} tok/s")
                    keep("peft sequential", outputs, rate)
                    say(f"peft: set_adapter per adapter group, {len(sample)} requests")
                    rate = peft.grouped(sample)
                    say(f"  {rate:.1f} tok/s")
                    keep("peft grouped", None, rate)
                    say(f"HF generate, adapters disabled, {len(sample)} requests")
                    rate = peft.base([p for _, p in sample])
                    say(f"  {rate:.1f} tok/s")
                    keep("hf base", None, rate)
                worker = next(iter(with_adapters.device_loop.workers.values()))
                found["stats"] = worker.adapters.stats
            finally:
                with_adapters.close()
                without.close()
            return found

        say("loading peft with the same adapters")
        peft = PeftServer(
            registry, base, names, dtype, args.new_tokens, tokenizer.pad_token_id or 0
        )
        found = asyncio.run(ours())
    mixed_out = found["mixed"][0]
    peft_out = found["peft sequential"][0]
    stats = found["stats"]

    def best(label: str) -> float:
        return float(found[label][1])

    def median(label: str) -> float:
        return float(statistics.median(found[label, "rates"]))

    def row(run: str, label: str, ratio: str = "—") -> None:
        print(f"| {run} | {best(label):.1f} | {median(label):.1f} | {ratio} |")

    def ratio(text: str, top: str, bottom: str, digits: int = 2, unit: str = "") -> str:
        b = best(top) / best(bottom)
        m = median(top) / median(bottom)
        return f"{text} = {b:.{digits}f}{unit} (median {m:.{digits}f}{unit})"

    equal = sum(mixed_out[i] == peft_out[k] for k, i in enumerate(sample_at))
    print()
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{dtype_name(dtype)}, {args.adapters} adapters rank {args.rank}, "
        f"{n} requests x {args.new_tokens} tokens, peft on {len(sample)} of them, "
        f"{args.rounds} rounds"
    )
    print()
    print("| run | tokens/s (best) | tokens/s (median) | ratio: best (median) |")
    print("|---|---|---|---|")
    row(f"mixed batch ({n // len(names) or 1} per adapter)", "mixed")
    row(
        "all on one adapter",
        "one adapter",
        ratio("mixed / one", "mixed", "one adapter") + " (target ≥ 0.8)",
    )
    row(
        f"peft, set_adapter per request ({len(sample)} requests)",
        "peft sequential",
        ratio("mixed / peft", "mixed", "peft sequential", 1, "x") + " (target ≥ 5x)",
    )
    row(
        "peft, set_adapter per adapter group",
        "peft grouped",
        ratio("mixed / peft grouped", "mixed", "peft grouped", 1, "x"),
    )
    row(
        "base only, adapters resident",
        "base, adapters resident",
        ratio("resident / none", "base, adapters resident", "base, no adapters"),
    )
    row("base only, no adapters", "base, no adapters")
    row(
        "HF generate of the base, one request at a time (reference)",
        "hf base",
        ratio("peft sequential / this", "peft sequential", "hf base"),
    )
    print()
    print(
        f"hot load p50: {statistics.median(stats.load_seconds) * 1000:.0f} ms from the registry "
        f"(digest check + read) + {statistics.median(stats.place_seconds) * 1000:.1f} ms into "
        f"a device slot ({len(stats.load_seconds)} loads)"
    )
    print(f"mixed-batch requests equal to peft's sequential greedy output: {equal}/{len(sample)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

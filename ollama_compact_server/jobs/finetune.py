"""Fine-tuning into the registry: trains a LoRA, DoRA or IA3 adapter on a registry model
with the user's data and adds it as an adapter model on that base, in one registry
transaction when training has finished (a failure or a stop leaves the registry as it
was). Checkpoints, kept under the registry's ``training/`` folder until the run finishes,
let a stopped run resume.

A compressed base (int8 / int4 / nf4, or a quantized GGUF import) stays compressed and
frozen for LoRA (QLoRA); DoRA and IA3, whose updates need the base weight itself, train on
its float expansion, which holds the same values."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..modeling.memory import check_memory
from ..registry.errors import InvalidModel, ModelNotFound, RegistryError
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from ..training.data import DataError, Dataset, Encoder, read_dataset, split, template_renderer
from ..training.params import TrainingError, TrainParams

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
CHECKPOINTS = "training"  # under the registry root
_RUNNING = threading.Lock()  # one training job at a time in a process


class Busy(RegistryError):
    status = 409


class Stopped(RegistryError):
    """The run was stopped; its checkpoint is kept for resume."""

    status = 499


@dataclass(slots=True)
class FinetuneSpec:
    base: str
    name: str
    data: Path
    data_name: str = ""  # the name the user knows the file by (errors name it)
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    params: TrainParams = field(default_factory=TrainParams)
    resume: bool = False
    dataset: Dataset | None = None  # read by precheck, once


def check_base(registry: Registry, base: str) -> ModelRecord:
    try:
        record = registry.get(base)
    except ModelNotFound:
        raise ModelNotFound(f"base model '{base}' not found") from None
    if record.is_adapter:
        raise InvalidModel(
            f"'{record.name.display()}' is an adapter; train on its base "
            f"'{record.config.base_model}' instead"
        )
    if record.config.kind != "model" or "embedding" in (record.config.capabilities or []):
        raise InvalidModel(f"'{record.name.display()}' is not a language model to fine-tune")
    if record.config.format != "safetensors":
        raise InvalidModel(f"'{record.name.display()}' is not a safetensors model")
    return record


def precheck(registry: Registry, spec: FinetuneSpec) -> tuple[ModelRecord, Dataset]:
    """Everything refused before any weights load: the names, the base, the whole data
    file (raises InvalidModel / ModelNotFound, 400 / 404)."""
    ModelName.parse(spec.name)
    record = check_base(registry, spec.base)
    if spec.dataset is None:  # the route's precheck already read it: not twice
        try:
            spec.dataset = read_dataset(
                spec.data, spec.format, spec.columns, spec.data_name or None
            )
        except DataError as exc:
            raise InvalidModel(str(exc)) from None
    return record, spec.dataset


def checkpoint_dir(registry: Registry, name: str) -> Path:
    key = hashlib.sha256(ModelName.parse(name).display().encode()).hexdigest()[:16]
    return Path(registry.root) / CHECKPOINTS / key


def finetune(
    registry: Registry,
    spec: FinetuneSpec,
    progress: Progress,
    cancel: threading.Event | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> ModelRecord:
    """Trains and adds the adapter model ``spec.name``; raises InvalidModel for bad data or
    settings, Stopped when ``cancel`` is set (or on Ctrl-C), Busy while another runs.
    ``precision`` (OCS_DTYPE): auto computes in bfloat16 where the hardware multiplies it
    natively, float32 elsewhere."""
    if not _RUNNING.acquire(blocking=False):
        raise Busy("another fine-tuning job is running in this daemon; try again when it ends")
    from ..training.loop import Cancelled

    try:
        return _finetune(registry, spec, progress, cancel or threading.Event(), device, precision)
    except (DataError, TrainingError) as exc:
        raise InvalidModel(str(exc)) from None
    except (Cancelled, KeyboardInterrupt):  # outside the training steps (loading, evaluating)
        raise Stopped("fine-tuning stopped; the registry is unchanged") from None
    finally:
        _RUNNING.release()


def _finetune(
    registry: Registry,
    spec: FinetuneSpec,
    progress: Progress,
    cancel: threading.Event,
    device_name: str,
    precision: str,
) -> ModelRecord:
    import torch

    from ..modeling.loader import load_causal_lm, load_tokenizer
    from ..modeling.quantized import CompressedLinear
    from ..registry.importers import import_adapter_dir
    from ..training import loop

    params = spec.params
    progress({"status": "reading data"})
    base, dataset = precheck(registry, spec)
    target = ModelName.parse(spec.name)
    progress({"status": "loading tokenizer"})
    tokenizer = load_tokenizer(registry, base)
    template = registry.template(base)
    encoder = Encoder(
        tokenizer,
        template_renderer(template, tokenizer) if template else None,
        params.max_length,
        registry.system(base),
    )
    progress({"status": "tokenizing data"})
    items = []
    for example in dataset.examples:
        for item in encoder.encode(example):
            if item.trained:
                items.append(item)
    if not items:
        raise DataError(f"{dataset.name}: no example leaves a token to learn")
    train_items, held_out = split(items, params.eval_split, params.seed)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id or 0
    device = _device(device_name)
    dtype = training_dtype(precision, device)
    compressed_base = base.config.quantization is not None
    if device.type == "cpu":
        check_memory(
            memory_needed(
                base,
                params,
                len(tokenizer),
                compressed_base,
                2 if dtype == torch.bfloat16 else 4,
                max(len(item.ids) for item in items),
                max(item.trained for item in items),
            ),
            f"fine-tuning '{base.name.display()}' with batch size {params.batch_size} and "
            f"max length {params.max_length}",
        )
    progress({"status": "loading base model"})
    model = load_causal_lm(
        registry, base, dtype, dequantize=compressed_base and params.method != "lora"
    )
    compressed = any(isinstance(m, CompressedLinear) for m in model.modules())
    model.to(device)
    peft_model = loop.attach_adapter(model, params, compressed)
    fingerprint = {
        "base": base.digest,
        "data": dataset.sha256,
        "format": dataset.format,
        "columns": spec.columns,
        "params": params.comparable(),
    }
    run = loop.Run(peft_model, params, train_items, pad, device, fingerprint, dtype)
    checkpoint = checkpoint_dir(registry, spec.name)
    if spec.resume:
        if not (checkpoint / "state.json").is_file():
            raise TrainingError(f"no stopped run of '{target.display()}' to resume")
        run.restore(checkpoint)
        progress({"status": f"resuming at step {run.state.step}"})
    progress({"status": "evaluating base model", "total": len(held_out)})
    with peft_model.disable_adapter():
        base_loss = loop.evaluate(
            peft_model, held_out, params.batch_size, pad, device, cancel, dtype
        )
    started = time.perf_counter()
    try:
        state = run.run(progress, cancel, checkpoint)
    except loop.Cancelled:
        raise Stopped(
            f"training stopped at step {run.state.step} of {run.total}; the registry is "
            "unchanged" + ("; resume to continue" if run.state.step else "")
        ) from None
    progress({"status": "evaluating adapter", "total": len(held_out)})
    adapter_loss = loop.evaluate(
        peft_model, held_out, params.batch_size, pad, device, cancel, dtype
    )
    report = _report(
        spec, base, dataset, run, state, base_loss, adapter_loss, len(items), len(held_out)
    )
    report["dtype"] = str(dtype).removeprefix("torch.")
    report["device"] = str(device)
    report["seconds"] = round(state.seconds, 1)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    if encoder.truncated:
        report["truncated_examples"] = encoder.truncated
    progress({"status": "trained", "report": report})
    progress({"status": "writing adapter"})
    with tempfile.TemporaryDirectory(prefix="ocs-finetune-") as scratch:
        folder = Path(scratch)
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base.name.display()  # not a server path
        peft_model.save_pretrained(
            str(folder), safe_serialization=True, save_embedding_layers=False
        )
        for extra in folder.iterdir():  # only the two files an adapter model holds
            if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        record = import_adapter_dir(
            registry,
            folder,
            target,
            base.name,
            source={"kind": "finetune", "ref": dataset.name, "sha256": dataset.sha256},
            training=report,
            progress=lambda status, done, total: progress({"status": status}),
        )
    shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def memory_needed(
    base: ModelRecord,
    params: TrainParams,
    vocab: int,
    compressed: bool,
    width: int,
    longest: int,
    learnt: int,
) -> int:
    """A rough upper bound of what a run holds on the CPU: the weights (as stored for QLoRA,
    else ``width`` bytes a parameter), a micro-batch's activations (``longest`` tokens a
    row) and the output head's logits with their gradient (``learnt`` positions a row at
    most)."""
    config = base.config
    parameters = config.parameter_count or base.size // 2
    keep_compressed = compressed and params.method == "lora"
    weights = base.size if keep_compressed else width * parameters
    tokens = params.batch_size * longest
    hidden = config.embedding_length or 1024
    layers = max(1, (parameters - vocab * hidden) // max(12 * hidden * hidden, 1))
    activations = tokens * hidden * layers * 24 * 4
    logits = params.batch_size * learnt * max(vocab, 1) * 4 * 3
    return weights + activations + logits


def training_dtype(precision: str, device: Any) -> Any:
    """The compute dtype of a run: bfloat16 when asked, or under auto where it is native
    (AMX / AVX512-BF16 CPUs, CUDA devices that support it); float32 otherwise (float16
    would need loss scaling)."""
    import torch

    from ..modeling.hardware import cpu_has_fast_bf16

    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(f"device {name} is not present here (OCS_DEVICE / --device)")
    return device


def _report(
    spec: FinetuneSpec,
    base: ModelRecord,
    dataset: Dataset,
    run: Any,
    state: Any,
    base_loss: float | None,
    adapter_loss: float | None,
    examples: int,
    held: int,
) -> dict[str, Any]:
    from ..training.loop import thin

    params = spec.params
    report: dict[str, Any] = {
        "method": params.method,
        "base_model": base.name.display(),
        "base_quantization": base.config.quantization.scheme if base.config.quantization else "",
        "data": {"name": dataset.name, "sha256": dataset.sha256, "format": dataset.format},
        "examples": examples,
        "eval_examples": held,
        "steps": state.step,
        "epochs": round(state.step / max(run.per_epoch, 1), 3),
        "train_tokens": state.tokens,
        "tokens_per_second": round(state.tokens / max(state.seconds, 1e-9), 1),
        "params": asdict(params) | {"learning_rate": params.lr, "target_modules": params.targets()},
        "loss_curve": thin(state.curve),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if base_loss is not None and adapter_loss is not None:
        report.update(
            eval_loss_base=round(base_loss, 5),
            eval_loss_adapter=round(adapter_loss, 5),
            perplexity_base=round(math.exp(min(base_loss, 50)), 4),
            perplexity_adapter=round(math.exp(min(adapter_loss, 50)), 4),
            perplexity_change=round(math.exp(min(adapter_loss - base_loss, 50)) - 1, 5),
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as the CLI prints it."""
    lines = [
        f"method {report.get('method')} on {report.get('base_model')}"
        + (f" ({report['base_quantization']})" if report.get("base_quantization") else ""),
        f"{report.get('steps')} steps, {report.get('epochs')} epochs, "
        f"{report.get('train_tokens')} tokens at {report.get('tokens_per_second')} tokens/s",
    ]
    if "eval_loss_base" in report:
        lines.append(
            f"held-out loss {report['eval_loss_base']:.4f} -> {report['eval_loss_adapter']:.4f}, "
            f"perplexity {report['perplexity_base']:.2f} -> {report['perplexity_adapter']:.2f} "
            f"({100 * report['perplexity_change']:+.1f}%) on {report.get('eval_examples')} "
            "held-out examples"
        )
    return "\n".join(lines)

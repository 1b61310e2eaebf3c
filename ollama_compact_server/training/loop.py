"""The training loop: a peft adapter (LoRA, DoRA or IA3) on a frozen base, float or
compressed (QLoRA: the compressed linears stay as stored and dequantize on the fly where a
gradient must pass through them), trained with AdamW on length-grouped batches.

Our own loop rather than transformers' Trainer: the loss is computed on the learnt
positions only (the output head runs on those rows, not on every position of a 262k
vocabulary), batches group examples of similar length (less padding), and progress,
cancellation and checkpoints are ours to shape. ``benchmarks/bench_finetune.py`` measures
it against Trainer on the same data.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import IGNORE, Tokenized
from .params import IA3_FEEDFORWARD, TrainingError, TrainParams

CURVE_POINTS = 200  # loss-curve points kept in the report
GROUP = 16  # batches of similar length are formed within this many batches' worth of rows


class Cancelled(Exception):
    """The job was stopped (Ctrl-C, a client that went away)."""


# ------------------------------------------------------------------------------ the model


def attach_adapter(model: Any, params: TrainParams, compressed: bool) -> Any:
    """A peft model training a fresh adapter on ``model`` (frozen)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    targets = params.targets()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise TrainingError(
            f"the base model has no modules named {', '.join(missing)} to train "
            f"(it has e.g. {', '.join(sorted(p for p in present if p.endswith('proj'))[:8])})"
        )
    config: Any
    if params.method == "ia3":
        if compressed:
            raise TrainingError(
                "IA3 trains on float bases only; for a compressed base use method lora (QLoRA)"
            )
        config = IA3Config(
            target_modules=targets,
            feedforward_modules=[t for t in targets if t in IA3_FEEDFORWARD],
            task_type="CAUSAL_LM",
        )
    else:
        if compressed and params.method == "dora":
            raise TrainingError(
                "DoRA trains on float bases only; for a compressed base use method lora (QLoRA)"
            )
        config = LoraConfig(
            r=params.rank,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=targets,
            use_dora=params.method == "dora",
            task_type="CAUSAL_LM",
        )
        if compressed:
            from peft.tuners.lora.layer import Linear as PeftLoraLinear

            from ..modeling.quantized import KINDS

            config._register_custom_module({cls: PeftLoraLinear for cls in KINDS.values()})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns about the compressed linears it wraps
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        peft_model = get_peft_model(model, config)
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # the adapter learns in float32
    return peft_model


def _head(peft_model: Any) -> tuple[Any, Any, float | None]:
    """The decoder stack, the output head and the final logit soft cap of a causal LM."""
    lm = peft_model.get_base_model()
    decoder, head = getattr(lm, "model", None), getattr(lm, "lm_head", None)
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    return decoder, head, cap


def loss_sum(peft_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of a batch's learnt tokens, and how many there are. The
    output head runs on the learnt positions only."""
    labels = batch["labels"]
    target = labels[:, 1:]
    keep = target != IGNORE
    count = int(keep.sum())
    decoder, head, cap = _head(peft_model)
    if decoder is not None and head is not None:
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:  # a model of another shape: full logits
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][keep]
    logits = logits.float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return loss, count


def collate(items: list[Tokenized], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(item.ids) for item in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.ids)
        ids[row, :n] = torch.tensor(item.ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
    }


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (indices): shuffled, then grouped by length within windows of
    GROUP batches so a batch pads little, then the batches shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)  # noqa: S311 (reproducible order)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * GROUP
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def evaluate(
    peft_model: Any,
    items: list[Tokenized],
    batch_size: int,
    pad: int,
    device: torch.device,
    cancel: threading.Event | None = None,
    dtype: torch.dtype = torch.float32,
) -> float | None:
    """Mean loss per learnt token over ``items`` (None without items)."""
    if not items:
        return None
    peft_model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    with torch.inference_mode(), _autocast(device, dtype):
        for start in range(0, len(order), batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            batch = collate([items[i] for i in order[start : start + batch_size]], pad, device)
            loss, n = loss_sum(peft_model, batch)
            total += float(loss)
            count += n
    return total / max(count, 1)


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """bfloat16 matmuls where the run computes in bfloat16 (the adapter's weights and the
    loss stay float32), nothing otherwise."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# ------------------------------------------------------------------------------ the run


@dataclass(slots=True)
class State:
    """Where a run stands: saved with each checkpoint."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    curve: list[list[float]] = field(default_factory=list)  # [step, loss]
    fingerprint: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[dict[str, Any]], None]


class Run:
    def __init__(
        self,
        peft_model: Any,
        params: TrainParams,
        train: list[Tokenized],
        pad: int,
        device: torch.device,
        fingerprint: dict[str, Any],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not train:
            raise TrainingError("no training examples are left after the held-out split")
        self.model = peft_model
        self.params = params
        self.train = train
        self.pad = pad
        self.device = device
        self.dtype = dtype
        self.lengths = [len(t.ids) for t in train]
        per_epoch = math.ceil(math.ceil(len(train) / params.batch_size) / params.grad_accum)
        self.per_epoch = per_epoch
        self.total = params.max_steps or max(1, math.ceil(per_epoch * params.epochs))
        self.warmup = int(self.total * params.warmup_ratio)
        self.state = State(fingerprint=fingerprint)
        self.trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable], lr=params.lr, weight_decay=0.0
        )

    def rate(self, step: int) -> float:
        """The learning-rate factor at optimizer step ``step``: linear warm-up, then linear
        decay."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def _micro_batches(self, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step`` (deterministic: a resumed run takes
        the batches the stopped one would have)."""
        accum = self.params.grad_accum
        per_epoch_batches = self.per_epoch * accum
        first = step * accum
        out = []
        for flat in range(first, first + accum):
            epoch, index = divmod(flat, per_epoch_batches)
            batches = self._epoch(epoch)
            if index < len(batches):
                out.append(batches[index])
        return out

    _cached: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            batches = epoch_batches(self.lengths, self.params.batch_size, self.params.seed, epoch)
            self._cached = (epoch, batches)
        return self._cached[1]

    def run(
        self,
        progress: Progress,
        cancel: threading.Event,
        checkpoint: Path | None = None,
    ) -> State:
        """Trains to the last step; saves a checkpoint every ``save_steps`` and when
        stopped (then raises Cancelled)."""
        params, state = self.params, self.state
        self.model.train()
        started = time.perf_counter() - state.seconds
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while state.step < self.total:
                factor = self.rate(state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = params.lr * factor
                micro = self._micro_batches(state.step)
                batches = [
                    collate([self.train[i] for i in idx], self.pad, self.device) for idx in micro
                ]
                learnt = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
                total_loss = 0.0
                for batch in batches:
                    if cancel.is_set():
                        raise Cancelled()
                    with _autocast(self.device, self.dtype):
                        loss, _ = loss_sum(self.model, batch)
                    (loss / max(learnt, 1)).backward()
                    total_loss += float(loss.detach())
                    tokens = int(batch["attention_mask"].sum())
                    state.tokens += tokens
                    window_tokens += tokens
                torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                mean = total_loss / max(learnt, 1)
                state.curve.append([state.step, round(mean, 5)])
                now = time.perf_counter()
                state.seconds = now - started
                speed = window_tokens / max(now - window_start, 1e-9)
                if now - window_start > 10:  # tokens/s over the last seconds, not the run
                    window_tokens, window_start = 0, now
                left = (self.total - state.step) * state.seconds / max(state.step, 1)
                progress(
                    {
                        "status": "training",
                        "completed": state.step,
                        "total": self.total,
                        "loss": round(mean, 4),
                        "learning_rate": params.lr * factor,
                        "epoch": round(state.step / max(self.per_epoch, 1), 3),
                        "tokens_per_second": round(speed, 1),
                        "eta_seconds": round(left, 1),
                    }
                )
                if checkpoint is not None and state.step % params.save_steps == 0:
                    self.save(checkpoint)
        except (Cancelled, KeyboardInterrupt):
            if checkpoint is not None and state.step > 0:
                self.save(checkpoint)
            raise Cancelled() from None
        self.model.eval()
        return state

    # -------------------------------------------------------------- checkpoints

    def save(self, directory: Path) -> None:
        """The adapter, the optimizer's moments and the run's state, written to a
        temporary folder first and renamed into place (a crash keeps the older one)."""
        from safetensors.torch import save_file

        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        moments: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        steps = 0
        for name, parameter in self.trainable:
            weights[name] = parameter.detach().cpu().contiguous()
            slot = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in slot:
                    moments[f"{name}::{key}"] = slot[key].detach().cpu().contiguous()
            if "step" in slot:
                steps = int(slot["step"])
        save_file(weights, str(scratch / "weights.safetensors"))
        save_file(moments, str(scratch / "optimizer.safetensors"))
        record = asdict(self.state)
        record["optimizer_steps"] = steps
        (scratch / "state.json").write_text(json.dumps(record))
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        if directory.exists():
            directory.rename(old)
        scratch.rename(directory)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self, directory: Path) -> None:
        """Continues from a checkpoint of the same run (same base, data and settings)."""
        from safetensors.torch import load_file

        try:
            record = json.loads((directory / "state.json").read_text())
            weights = load_file(str(directory / "weights.safetensors"))
            moments = load_file(str(directory / "optimizer.safetensors"))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"the checkpoint cannot be read ({exc}); start over") from None
        if record.get("fingerprint") != self.state.fingerprint:
            raise TrainingError(
                "the checkpoint was made from other data, base model or settings; "
                "start over without resume"
            )
        named = dict(self.trainable)
        if set(weights) != set(named):
            raise TrainingError("the checkpoint does not match this adapter; start over")
        steps = int(record.get("optimizer_steps", 0))
        with torch.no_grad():
            for name, parameter in self.trainable:
                value = weights[name]
                if value.shape != parameter.shape:
                    raise TrainingError("the checkpoint does not match this adapter; start over")
                parameter.copy_(value)
                slot: dict[str, Any] = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    if f"{name}::{key}" in moments:
                        slot[key] = moments[f"{name}::{key}"].to(parameter.device)
                if slot and steps:
                    slot["step"] = torch.tensor(float(steps))
                    self.optimizer.state[parameter] = slot
        self.state.step = int(record.get("step", 0))
        self.state.tokens = int(record.get("tokens", 0))
        self.state.seconds = float(record.get("seconds", 0.0))
        self.state.curve = [list(p) for p in record.get("curve", [])]


def thin(curve: list[list[float]], points: int = CURVE_POINTS) -> list[list[float]]:
    """At most ``points`` points of a loss curve, each the mean of its stretch."""
    if len(curve) <= points:
        return curve
    size = len(curve) / points
    out = []
    for i in range(points):
        part = curve[int(i * size) : int((i + 1) * size)] or curve[-1:]
        out.append([part[-1][0], round(sum(p[1] for p in part) / len(part), 5)])
    return out

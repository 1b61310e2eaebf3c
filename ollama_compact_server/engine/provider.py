"""Loads registry models for the device loop (transformers modules, sdpa attention)."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..compress.schemes import recorded
from ..modeling.loader import load_causal_lm, load_encoder, load_tokenizer
from ..modeling.lora import LoraWeights, read_peft_adapter
from ..registry.manifest import MT_ADAPTER_FILE
from ..registry.store import ModelRecord, Registry
from .adapters import AdapterRef, Target
from .constraint import GuidedTokenizer
from .device import dtype_name, integer_scheme, model_dtype
from .planner import Plan, format_plan, plan_memory, serving_plan
from .sequence import LoadedModel
from .types import EngineError

log = logging.getLogger(__name__)


def stop_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in eos if isinstance(eos, list) else [eos]:
        if isinstance(value, int):
            ids.add(value)
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    return ids


def scheme_of(record: ModelRecord) -> str | None:
    quantization = record.config.quantization
    return quantization.scheme if quantization is not None else None


class RegistryProvider:
    """``dtype``: one torch dtype for every model, or the OCS_DTYPE setting (``"auto"``...),
    then chosen per model by :func:`model_dtype`."""

    def __init__(self, registry: Registry, device: torch.device, dtype: torch.dtype | str) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.warned: set[str] = set()  # adapters whose base changed, logged once
        self._guides: OrderedDict[str, GuidedTokenizer] = OrderedDict()  # by base digest
        self._guides_lock = threading.Lock()

    def dtype_for(self, record: ModelRecord) -> torch.dtype:
        if isinstance(self.dtype, str):
            return model_dtype(self.dtype, self.device, scheme_of(record))
        return self.dtype

    def resolve(self, name: str) -> Target:
        """An adapter model runs on its base; the adapter is named by its weights' digests."""
        record = self.registry.get(name)
        if not record.is_adapter or not record.config.base_model:
            return Target(record.name.display())
        files = tuple(
            sorted((f, layer.digest) for f, layer in record.manifest.files(MT_ADAPTER_FILE).items())
        )
        base = self.registry.get(record.config.base_model)
        changed = record.config.base_digest and record.config.base_digest != base.digest
        if changed and record.digest not in self.warned:
            self.warned.add(record.digest)
            log.warning(
                "adapter %s was made for another version of %s (base digest %s, now %s); "
                "serving it on the current one",
                record.name.display(),
                base.name.display(),
                str(record.config.base_digest)[:12],
                base.digest[:12],
            )
        return Target(base.name.display(), AdapterRef(record.name.display(), record.digest, files))

    def guide(self, name: str) -> GuidedTokenizer:
        """The model's tokenizer for structured output (kept for the last few models)."""
        record = self.registry.get(name)
        if record.is_adapter and record.config.base_model:
            record = self.registry.get(record.config.base_model)
        with self._guides_lock:
            cached = self._guides.get(record.digest)
            if cached is not None:
                self._guides.move_to_end(record.digest)
                return cached
        tokenizer = load_tokenizer(self.registry, record)
        data = self.registry.blobs.read_bytes(record.manifest.files()["config.json"].digest)
        config = json.loads(data)
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        vocab = config.get("vocab_size") or text.get("vocab_size") or len(tokenizer)
        guided = GuidedTokenizer(tokenizer, int(vocab))
        with self._guides_lock:
            self._guides[record.digest] = guided
            while len(self._guides) > 4:
                self._guides.popitem(last=False)
        return guided

    def load_adapter(self, ref: AdapterRef) -> LoraWeights:
        """Reads an adapter's files (each checked against its digest) into host memory."""
        files = {name: self.registry.blobs.verify(digest) for name, digest in ref.files}
        config = json.loads(files["adapter_config.json"].read_text(encoding="utf-8"))
        return read_peft_adapter(config, files["adapter_model.safetensors"], ref.key)

    def __call__(self, name: str) -> LoadedModel:
        record = self.registry.get(name)
        if record.is_adapter and record.config.base_model:
            record = self.registry.get(record.config.base_model)
        dtype = self.dtype_for(record)
        if record.config.embedding is not None:  # a dedicated embedding model
            encoder = load_encoder(self.registry, record, dtype=dtype)
            encoder.to(self.device)
            return LoadedModel(
                model=encoder,
                tokenizer=load_tokenizer(self.registry, record),
                stop_ids=set(),
                pooling=record.config.embedding.pooling,
                dtype=dtype,
            )
        model = load_causal_lm(self.registry, record, dtype=dtype)
        model.to(self.device)
        if self.device.type == "cpu":
            from ..modeling.quantized import prepare_for_cpu

            prepare_for_cpu(model)
        base = (
            self.registry.get(record.config.base_model)
            if record.is_adapter and record.config.base_model
            else record
        )
        tokenizer = load_tokenizer(self.registry, base)  # an adapter uses its base's
        return LoadedModel(
            model=model, tokenizer=tokenizer, stop_ids=stop_ids_of(model, tokenizer), dtype=dtype
        )


class RegistrySizing:
    """Sizes models from their registry config with the memory planner: an estimate for
    making room before a load, and the exact slots x context the engine then allocates."""

    def __init__(
        self,
        registry: Registry,
        *,
        dtype: torch.dtype | str,
        num_parallel: int,
        context_length: int,
        max_loras: int = 0,
        integer_dtype: str | None = None,
    ) -> None:
        self.registry = registry
        self.max_loras = max_loras
        self.dtype_name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        # the dtype of int8 / int4 models where it differs (auto on CPU: float32)
        self.integer_dtype = integer_dtype or self.dtype_name
        self.num_parallel = num_parallel
        self.context_length = context_length

    def _base(self, name: str) -> ModelRecord:
        record = self.registry.get(name)
        if record.is_adapter and record.config.base_model:
            return self.registry.get(record.config.base_model)
        return record

    def serving_dtype(self, name: str) -> str:
        """The dtype ``name`` serves in: its KV cache's and its activations'."""
        if integer_scheme(scheme_of(self._base(name))):
            return self.integer_dtype
        return self.dtype_name

    def weight_format(self, name: str) -> str:
        """The planner's weight format: the one a compressed model's scheme runs as (int2
        runs as int4, mixed is sized as int8), else the serving dtype."""
        handler = recorded(scheme_of(self._base(name)))
        if handler is None or handler.runtime_format is None:
            return self.dtype_name
        return handler.runtime_format

    def hf_config(self, name: str) -> dict[str, Any]:
        base = self._base(name)
        data = self.registry.blobs.read_bytes(base.manifest.files()["config.json"].digest)
        config = json.loads(data)
        return config if isinstance(config, dict) else {}

    def context_for(self, config: dict[str, Any]) -> int:
        from ..registry.importers import context_length

        model_context = context_length(config) or self.context_length
        return min(self.context_length, model_context)

    def adapters_of(self, name: str) -> tuple[int, int]:
        """Adapter slots to reserve beside ``name``: none without registry adapters for it,
        else the OCS_MAX_LORAS slots the engine allocates, at their highest rank (one more
        for DoRA's and IA3's per-output vectors)."""
        base = self.registry.get(name).name.display()
        ranks = [
            info.r + (1 if info.use_dora or info.peft_type == "IA3" else 0)
            for record in self.registry.models()
            if record.is_adapter
            and record.config.base_model == base
            and (info := record.config.adapter) is not None
        ]
        if not ranks or not self.max_loras:
            return 0, 16
        return self.max_loras, max(ranks)

    def estimate(self, name: str) -> int:
        """Bytes needed to load ``name`` with at least one sequence of context."""
        config = self.hf_config(name)
        plan = plan_memory(
            config,
            budget=1 << 62,
            kv_dtype=self.serving_dtype(name),
            weight_format=self.weight_format(name),
            num_parallel=1,
            context=self.context_for(config),
            activation_reserve=0,
        )
        return plan.weight_bytes + plan.kv_bytes

    def plan_for(self, name: str, config: dict[str, Any], budget: int) -> Plan:
        """The plan for registry model ``name`` (``config``: its config.json) in ``budget``
        bytes: what the engine allocates and `ollama-compact plan` prints."""
        adapters, rank = self.adapters_of(name)
        return serving_plan(
            config,
            budget=budget,
            dtype=self.serving_dtype(name),
            weight_format=self.weight_format(name),
            num_parallel=self.num_parallel,
            context_length=self.context_length,
            adapters=adapters,
            adapter_rank=rank,
        )

    def plan(self, name: str, loaded: LoadedModel, available: int | None) -> tuple[int, int]:
        config = loaded.model.config.to_dict()
        if available is None:
            return self.num_parallel, self.context_for(config)
        plan = self.plan_for(name, config, available)
        log.info("memory plan for %s:\n%s", name, format_plan(plan, name))
        if not plan.fits:
            raise EngineError(
                f"model '{name}' does not fit in the memory left ({max(available, 0) >> 20} MiB): "
                + "; ".join(plan.notes)
            )
        return plan.sequences, plan.context

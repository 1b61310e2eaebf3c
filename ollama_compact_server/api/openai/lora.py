"""vLLM's runtime adapter routes, which gateways and their adapter syncers call:
POST /v1/load_lora_adapter registers an adapter under a name and preloads it,
POST /v1/unload_lora_adapter takes it away. Answers as vLLM's: 200 with a plain-text
"Success: ..." line; errors in the OpenAI shape."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from ...engine.protocol import Engine
from ...engine.types import EngineError
from ...registry.runtime_lora import Outcome, add_runtime_adapter, remove_runtime_adapter
from ...settings import Settings
from ..common import json_body, registry_of
from ..errors import APIError
from ..wire import WireModel, body, parse

router = APIRouter(prefix="/v1")
log = logging.getLogger(__name__)


class LoadLoraAdapterRequest(WireModel):
    lora_name: str = Field(description="The model name requests will use for the adapter.")
    lora_path: str = Field(
        description="A folder inside the adapters folder (OCS_ADAPTERS), relative to it or "
        "absolute under it, or an adapter model of the registry. Nothing else."
    )
    load_inplace: bool = Field(
        False, description="Point a name this route added before at the new weights."
    )


class UnloadLoraAdapterRequest(WireModel):
    lora_name: str
    lora_int_id: int | None = Field(None, description="Accepted as vLLM does; not used.")


def _enabled(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if not settings.runtime_lora:  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: no route
        raise APIError(404, "runtime LoRA adapter loading is off (OCS_RUNTIME_LORA=false)")


@router.post(
    "/load_lora_adapter",
    openapi_extra=body(LoadLoraAdapterRequest),
    response_class=PlainTextResponse,
)
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    """Registers the adapter, then loads it (its base resident, the adapter in a device
    slot) so the first request finds it there. A load that fails takes a new name away
    again. Loading a name again with the same adapter succeeds (each replica on a shared
    registry loads it); other weights under it need ``load_inplace``."""
    _enabled(request)
    wire = parse(LoadLoraAdapterRequest, await json_body(request))
    if not wire.lora_name or not wire.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    settings: Settings = request.app.state.settings
    registry = registry_of(request)
    engine: Engine = request.app.state.engine
    async with request.app.state.lora_lock:
        record, outcome = await asyncio.to_thread(
            add_runtime_adapter,
            registry,
            settings.adapters,
            wire.lora_name,
            wire.lora_path,
            inplace=wire.load_inplace,
        )
        name = record.name.display()
        if outcome is Outcome.REPLACED:
            engine.unload(name)  # the old weights leave the slots once idle
        try:
            await engine.load(name)
        except EngineError as exc:
            if outcome is Outcome.ADDED:
                await asyncio.to_thread(registry.delete, record.name)
                engine.unload(name)
            raise APIError(
                exc.status if 400 <= exc.status < 600 else 500,
                f"the LoRA adapter '{wire.lora_name}' could not be loaded: {exc}",
            ) from None
    log.info("LoRA adapter %s %s (lora_path %r)", name, outcome.value, wire.lora_path[:200])
    return PlainTextResponse(f"Success: LoRA adapter '{wire.lora_name}' added successfully.")


@router.post(
    "/unload_lora_adapter",
    openapi_extra=body(UnloadLoraAdapterRequest),
    response_class=PlainTextResponse,
)
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    """A name /v1/load_lora_adapter added is removed (404 for it afterwards) and its
    weights leave the device slots once no request uses them. Any other adapter model (the
    drop-in folder, /api/create, an import) is only evicted from the slots and keeps its
    name; the answer says so."""
    _enabled(request)
    wire = parse(UnloadLoraAdapterRequest, await json_body(request))
    if not wire.lora_name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
    engine: Engine = request.app.state.engine
    async with request.app.state.lora_lock:
        name, removed = await asyncio.to_thread(
            remove_runtime_adapter, registry_of(request), wire.lora_name
        )
        engine.unload(name)
    if removed:
        log.info("removed LoRA adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{wire.lora_name}' removed successfully.")
    return PlainTextResponse(
        f"Success: LoRA adapter '{wire.lora_name}' evicted from the device; it stays in the "
        "registry (it was not loaded through /v1/load_lora_adapter)."
    )

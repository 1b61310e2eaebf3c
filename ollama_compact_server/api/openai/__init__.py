"""The OpenAI dialect (`/v1/*`): chat completions, legacy completions, the Responses API,
models, embeddings and vLLM's runtime LoRA routes, one router per job; wire shapes in ``wire``."""

from __future__ import annotations

from fastapi import APIRouter

from . import chat, completions, embeddings, lora, models, responses

router = APIRouter()
for part in (chat, completions, responses, models, embeddings, lora):
    router.include_router(part.router)

__all__ = ["router"]

"""The Ollama dialect (`/`, `/api/*`): one router per job (generation, models, embeddings,
model-management jobs), wire shapes in ``wire``."""

from __future__ import annotations

from fastapi import APIRouter

from . import chat, embeddings, jobs, models

router = APIRouter()
for part in (models, chat, embeddings, jobs):
    router.include_router(part.router)

__all__ = ["router"]

"""The Anthropic dialect: the Messages API at /v1/messages (what Claude Code and the
anthropic SDK call with ANTHROPIC_BASE_URL pointing here)."""

from __future__ import annotations

from .messages import router

__all__ = ["router"]

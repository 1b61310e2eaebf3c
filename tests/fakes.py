"""A fake engine implementing the engine protocol, for API tests that need exact control of
what the engine says (errors mid-stream, busy, slow streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ollama_compact_server.engine.types import (
    DEFAULT,
    EngineBusy,
    EngineError,
    FinishReason,
    GenerateRequest,
    KeepAlive,
    Resident,
    TokenEvent,
)


class FakeEngine:
    """Streams the words of ``script`` one per event; ``fail_after`` ends a stream with an
    error event after that many pieces; ``busy`` refuses with 503."""

    def __init__(self, script: str = "one two three", fail_after: int | None = None) -> None:
        self.script = script.split(" ")
        self.fail_after = fail_after
        self.finish_with: tuple[str, str | None] = ("stop", None)  # reason, stop sequence
        self.fail_only: int | None = None  # with fail_after: only this request (by order) fails
        self.busy = False
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.loaded: dict[str, KeepAlive] = {}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        request.sampling.validate()
        if self.busy:
            raise EngineBusy("server busy, please try again.  maximum pending requests exceeded")
        self.requests.append(request)
        number = len(self.requests) - 1
        fails = self.fail_only is None or self.fail_only == number
        finished = False
        try:
            for i, word in enumerate(self.script):
                if fails and self.fail_after is not None and i == self.fail_after:
                    finished = True
                    yield TokenEvent(finish_reason=FinishReason.ERROR, error="injected failure")
                    return
                await asyncio.sleep(0)
                yield TokenEvent(text=(" " if i else "") + word, token_ids=[i + 10])
            finished = True
            reason, stop_sequence = self.finish_with
            yield TokenEvent(
                finish_reason=FinishReason(reason),
                stop_sequence=stop_sequence,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=len(self.script),
                prompt_time=0.01,
                decode_time=0.02,
                total_time=0.03,
            )
        finally:
            if not finished:
                self.aborted.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def load(self, model: str, keep_alive: KeepAlive = DEFAULT) -> float:
        if model.startswith("missing"):
            raise EngineError(f"model '{model}' not found")
        self.loaded[model] = keep_alive
        return 0.0

    def unload(self, model: str) -> None:
        self.loaded.pop(model, None)

    def health(self) -> bool:
        return True

    def resident(self) -> list[Resident]:
        return [Resident(name, 1000, 4096, None, False) for name in self.loaded]

    def stats(self) -> dict:
        return {
            "queued": 0,
            "running": 0,
            "tokens_generated": len(self.requests),
            "ttft": [0.01],
            "itl": [],
        }

    def close(self) -> None:
        pass


async def _fake_embed(self: FakeEngine, request) -> TokenEvent:  # type: ignore[no-untyped-def]
    vectors = [[1.0, 0.0, 0.0] for _ in request.inputs]
    return TokenEvent(
        finish_reason=FinishReason.STOP,
        embeddings=vectors,
        prompt_tokens=sum(len(x) for x in request.inputs),
    )


FakeEngine.embed = _fake_embed  # type: ignore[attr-defined]

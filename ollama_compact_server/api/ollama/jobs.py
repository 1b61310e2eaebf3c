"""Ollama's model-management jobs: blob uploads, create, pull and push, with progress
streamed as NDJSON lines."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.options import merge_options
from ...chat.service import check_messages
from ...chat.templates import TemplateError
from ...chat.templates import check as check_template
from ...compress.schemes import SchemeError
from ...jobs import CreateSpec, ModelJobs, check_file_map
from ...registry.blobs import normalize_digest
from ...registry.errors import RegistryError
from ...threads import to_fresh_thread
from ..common import check_fields, json_body, registry_of
from ..errors import APIError
from ..streaming import ndjson
from .wire import JOB_FIELDS, model_field, parse_name

log = logging.getLogger(__name__)
router = APIRouter()


def jobs_of(request: Request) -> ModelJobs:
    jobs: ModelJobs = request.app.state.jobs
    return jobs


Report = Callable[[dict[str, Any]], None]


async def progress_response(
    body: dict[str, Any], run: Callable[[Report], None], failure: str
) -> Response:
    """Runs a long registry job (create, pull) on a thread, streaming its progress lines as
    NDJSON, or answering its last line alone when ``stream`` is false. A registry error
    becomes an in-band error line (or the error status without streaming)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def report(item: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    async def work() -> None:
        try:
            await to_fresh_thread(run, report)  # may run torch: threads.py
            await queue.put({"status": "success"})
        except RegistryError as exc:
            await queue.put({"error": str(exc), "_status": exc.status})
        except Exception:
            log.exception("%s", failure)
            await queue.put({"error": failure, "_status": 500})
        finally:
            await queue.put(None)

    task = asyncio.create_task(work())
    if body.get("stream") is False:
        last: dict[str, Any] = {}
        while (item := await queue.get()) is not None:
            last = item
        await task
        if "error" in last:
            raise APIError(int(last.pop("_status")), last["error"])
        return JSONResponse(last)

    async def items() -> AsyncIterator[dict[str, Any]]:
        previous = None
        while (item := await queue.get()) is not None:
            item.pop("_status", None)
            if item == previous:
                continue  # the same status twice in a row says nothing new
            previous = item
            yield item
        await task

    return ndjson(items())


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    registry = registry_of(request)
    if not registry.blobs.has(normalize_digest(digest)):
        raise APIError(404, f'blob "{digest[:80]}" not found')
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def blob_upload(request: Request, digest: str) -> Response:
    """Streams the body to disk (never whole in memory); bytes that do not hash to the
    digest are refused and leave nothing behind."""
    registry = registry_of(request)
    expected = normalize_digest(digest)
    if registry.blobs.has(expected):
        async for _ in request.stream():  # drain; the blob is already here
            pass
        return Response(status_code=200)
    upload = registry.blobs.begin_upload(expected)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= UPLOAD_FLUSH:
                await asyncio.to_thread(upload.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await asyncio.to_thread(upload.write, bytes(buffer))
        created = await asyncio.to_thread(upload.commit)
    except BaseException:
        upload.abort()  # client gone, disk full, digest mismatch: nothing stays behind
        raise
    return Response(status_code=201 if created else 200)


UPLOAD_FLUSH = 4 << 20


def _text_field(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{key} must be a string")
    return value


MAX_TEMPLATE_CHARS = 1 << 20
GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:\.[A-Za-z]|(?:if|range|with|end|else|template)\b)")


def _checked_template(template: str | None) -> str | None:
    """A template given to create must compile as a Jinja chat template: refused now
    rather than failing on every chat with the model later."""
    if template is None or not template.strip():
        return template
    if len(template) > MAX_TEMPLATE_CHARS:
        raise APIError(400, f"template is longer than {MAX_TEMPLATE_CHARS >> 10} KiB")
    try:
        check_template(template)
    except TemplateError as exc:
        if GO_TEMPLATE.search(template):
            raise APIError(
                400,
                "template looks like Ollama's Go template syntax ({{ .Prompt }}, {{ if .System }}"
                "); templates here must be Jinja chat templates, as in a Hugging Face "
                "tokenizer_config.json (for example {% for m in messages %}{{ m['role'] }}: "
                "{{ m['content'] }}{% endfor %})",
            ) from None
        raise APIError(400, f"template: {exc}") from None
    return template


def create_spec(body: dict[str, Any]) -> CreateSpec:
    name = parse_name(model_field(body))
    quantize = body.get("quantize") or body.get("quantization") or None
    quantize_options = body.get("quantize_options")
    if quantize is not None:
        try:
            ModelJobs.check_scheme(quantize, quantize_options)
        except SchemeError as exc:
            raise APIError(400, str(exc)) from None
        if not body.get("from") and not body.get("files"):
            raise APIError(
                400, "quantize needs 'from' (a registry model) or 'files' (uploaded weights)"
            )
    for forbidden in ("path", "modelfile"):
        if body.get(forbidden):
            raise APIError(
                400,
                f"'{forbidden}' is not accepted: upload files as blobs and name them in 'files'",
            )
    source = body.get("from")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise APIError(400, "from must be a model name")
    if source:
        parse_name(source, "from")
    license_value = body.get("license")
    if isinstance(license_value, str):
        license_value = [license_value]
    if license_value is not None and (
        not isinstance(license_value, list) or not all(isinstance(x, str) for x in license_value)
    ):
        raise APIError(400, "license must be a string or a list of strings")
    parameters = body.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters must be an object")
        merge_options(parameters)
    merge = body.get("merge", False)
    if not isinstance(merge, bool):
        raise APIError(400, "merge must be true or false")
    if merge and not source:
        raise APIError(400, "merge needs 'from': the adapter model to fold into its base")
    messages = body.get("messages")
    if messages is not None:
        check_messages(messages)
    return CreateSpec(
        name=name,
        from_=source or None,
        files=check_file_map(body.get("files"), "files"),
        adapters=check_file_map(body.get("adapters"), "adapters"),
        template=_checked_template(_text_field(body, "template")),
        system=_text_field(body, "system"),
        parameters=parameters,
        messages=messages,
        license=license_value,
        merge=merge,
        quantize=quantize,
        quantize_options=quantize_options,
    )


@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    spec = create_spec(body)
    registry = registry_of(request)
    jobs = jobs_of(request)
    if not spec.files and not spec.from_:
        raise APIError(400, "neither 'from' or 'files' was specified")
    if spec.from_ and not registry.exists(spec.from_):
        raise APIError(404, f"base model '{spec.from_}' not found")
    if spec.quantize and spec.from_:
        try:  # refusals that need no weights answer 400 before the stream starts
            await to_fresh_thread(
                jobs.precheck_compression, spec.from_, spec.quantize, spec.quantize_options
            )
        except SchemeError as exc:
            raise APIError(400, str(exc)) from None

    def run(report: Report) -> None:
        def progress(status: str, completed: int | None = None, total: int | None = None) -> None:
            item: dict[str, Any] = {"status": status}
            if total:
                item.update(total=total, completed=completed or 0)
            report(item)

        jobs.create(spec, progress)

    return await progress_response(body, run, "creating the model failed")


@router.post("/api/push")
async def push(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    name = model_field(body)
    raise APIError(
        400, f"pushing models is not supported: '{name[:100]}' stays in the local registry"
    )


# ------------------------------------------------------------------------------ pull


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    name = parse_name(model_field(body))
    ModelJobs.check_pull(name)
    jobs = jobs_of(request)
    last_sent: dict[str, int] = {}

    def run(report: Report) -> None:
        def progress(item: dict[str, Any]) -> None:
            digest = item.get("digest")
            if digest is not None:  # at most one line per file per MiB of progress
                step = int(item.get("completed", 0)) >> 20
                if last_sent.get(digest) == step and item.get("completed") != item.get("total"):
                    return
                last_sent[digest] = step
            report(item)

        jobs.pull(name, progress)

    return await progress_response(body, run, "pulling the model failed")

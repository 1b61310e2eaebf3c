"""Ollama's model-management jobs: blob uploads, create, pull and push, with progress
streamed as NDJSON lines."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.options import merge_options
from ...chat.service import check_messages
from ...chat.templates import TemplateError
from ...chat.templates import check as check_template
from ...compress.schemes import SchemeError
from ...jobs import CreateSpec, FinetuneSpec, ModelJobs, check_file_map
from ...registry.blobs import normalize_digest
from ...registry.errors import RegistryError
from ...registry.fsutil import check_free_space
from ...registry.store import Registry
from ...threads import to_fresh_thread
from ..common import json_body, registry_of
from ..errors import APIError
from ..streaming import ndjson
from ..wire import BINARY_BODY, body, parse
from .wire import CreateRequestWire, FinetuneRequestWire, JobRequest, parse_name

log = logging.getLogger(__name__)
router = APIRouter()


def jobs_of(request: Request) -> ModelJobs:
    jobs: ModelJobs = request.app.state.jobs
    return jobs


Report = Callable[[dict[str, Any]], None]


async def progress_response(
    stream: bool | None,
    run: Callable[[Report], None],
    failure: str,
    cancel: threading.Event | None = None,
    request: Request | None = None,
) -> Response:
    """Runs a long registry job (create, pull, finetune) on a thread, streaming its progress
    lines as NDJSON, or answering its last line alone when ``stream`` is false. A registry
    error becomes an in-band error line (or the error status without streaming). With
    ``cancel``, a client that goes away sets it (the job stops; create and pull finish)."""
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
    if stream is False:
        watcher = None
        if cancel is not None and request is not None:
            watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        last: dict[str, Any] = {}
        try:
            while (item := await queue.get()) is not None:
                last = item
            await task
        finally:
            if watcher is not None:
                watcher.cancel()
        if "error" in last:
            raise APIError(int(last.pop("_status")), last["error"])
        return JSONResponse(last)

    async def items() -> AsyncIterator[dict[str, Any]]:
        previous = None
        finished = False
        try:
            while (item := await queue.get()) is not None:
                item.pop("_status", None)
                if item == previous:
                    continue  # the same status twice in a row says nothing new
                previous = item
                yield item
            finished = True
            await task
        finally:
            if not finished and cancel is not None:
                cancel.set()  # the client went away before the end

    return ndjson(items())


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.5)


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    registry = registry_of(request)
    if not registry.blobs.has(normalize_digest(digest)):
        raise APIError(404, f'blob "{digest[:80]}" not found')
    return Response(status_code=200)


@router.post("/api/blobs/{digest}", openapi_extra=BINARY_BODY)
async def blob_upload(request: Request, digest: str) -> Response:
    """Streams the body to disk (never whole in memory); bytes that do not hash to the
    digest are refused and leave nothing behind. A body larger than OCS_MAX_BLOB_SIZE, or
    one that would leave less than 1 GiB free on the disk, is refused: up front from its
    Content-Length, else as it arrives."""
    registry = registry_of(request)
    expected = normalize_digest(digest)
    if registry.blobs.has(expected):
        registry.blobs.touch(expected)  # the sweep's grace starts again
        async for _ in request.stream():  # drain; the blob is already here
            pass
        return Response(status_code=200)
    cap = request.app.state.settings.max_blob_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        _check_room(registry, int(declared), cap)
    upload = registry.blobs.begin_upload(expected)
    buffer = bytearray()
    size = 0
    try:
        async for chunk in request.stream():
            buffer += chunk
            size += len(chunk)
            if len(buffer) >= UPLOAD_FLUSH:
                _check_room(registry, size, cap, written=size - len(buffer))
                await asyncio.to_thread(upload.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await asyncio.to_thread(upload.write, bytes(buffer))
        created = await asyncio.to_thread(upload.commit)
    except BaseException:
        upload.abort()  # client gone, disk full, digest mismatch: nothing stays behind
        raise
    return Response(status_code=201 if created else 200)


def _check_room(registry: Registry, size: int, cap: int, written: int = 0) -> None:
    """Refuses a blob of ``size`` bytes (``written`` of them on disk already) past the cap
    (413) or past the disk's free space less its reserve (507)."""
    if size > cap:
        raise APIError(413, f"the file is larger than the {cap / (1 << 30):.1f} GiB cap")
    check_free_space(registry.blobs.dir, size - written, "the file")


UPLOAD_FLUSH = 4 << 20


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


def create_spec(wire: CreateRequestWire) -> CreateSpec:
    """/api/create's fields, checked for what they mean before any work."""
    name = parse_name(wire.model_name())
    quantize = wire.quantize or wire.quantization or None
    if quantize is not None:
        try:
            ModelJobs.check_scheme(quantize, wire.quantize_options)
        except SchemeError as exc:
            raise APIError(400, str(exc)) from None
        if not wire.from_ and not wire.files:
            raise APIError(
                400, "quantize needs 'from' (a registry model) or 'files' (uploaded weights)"
            )
    for forbidden, value in (("path", wire.path), ("modelfile", wire.modelfile)):
        if value:
            raise APIError(
                400,
                f"'{forbidden}' is not accepted: upload files as blobs and name them in 'files'",
            )
    source = wire.from_
    if source is not None and not source.strip():
        raise APIError(400, "from must be a model name")
    if source:
        parse_name(source, "from")
    licenses = [wire.license] if isinstance(wire.license, str) else wire.license
    if wire.parameters is not None:
        merge_options(wire.parameters)
    if wire.merge and not source:
        raise APIError(400, "merge needs 'from': the adapter model to fold into its base")
    if wire.messages is not None:
        check_messages(wire.messages)
    return CreateSpec(
        name=name,
        from_=source or None,
        files=check_file_map(wire.files, "files"),
        adapters=check_file_map(wire.adapters, "adapters"),
        template=_checked_template(wire.template),
        system=wire.system,
        parameters=wire.parameters,
        messages=wire.messages,
        license=licenses,
        merge=bool(wire.merge),
        quantize=quantize,
        quantize_options=wire.quantize_options,
    )


@router.post("/api/create", openapi_extra=body(CreateRequestWire))
async def create(request: Request) -> Response:
    wire = parse(CreateRequestWire, await json_body(request))
    spec = create_spec(wire)
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

    return await progress_response(wire.stream, run, "creating the model failed")


@router.post("/api/push", openapi_extra=body(JobRequest))
async def push(request: Request) -> Response:
    name = parse(JobRequest, await json_body(request)).model_name()
    raise APIError(
        400, f"pushing models is not supported: '{name[:100]}' stays in the local registry"
    )


# ------------------------------------------------------------------------------ pull


@router.post("/api/pull", openapi_extra=body(JobRequest))
async def pull(request: Request) -> Response:
    wire = parse(JobRequest, await json_body(request))
    name = parse_name(wire.model_name())
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

    return await progress_response(wire.stream, run, "pulling the model failed")


# ------------------------------------------------------------------------------ finetune


def finetune_spec(wire: FinetuneRequestWire, registry: Registry) -> FinetuneSpec:
    """/api/finetune's fields, checked before any work (the data file is read later, on a
    thread, before any weights load)."""
    from ...training.data import FORMATS
    from ...training.params import TrainingError, check_params

    name = parse_name(wire.model_name())
    if not wire.from_ or not wire.from_.strip():
        raise APIError(400, "from must name the registry model to train on")
    parse_name(wire.from_, "from")
    files = check_file_map(wire.data, "data")
    if len(files) != 1:
        raise APIError(400, "data must map one file name to the digest of its uploaded blob")
    ((filename, digest),) = files.items()
    if not registry.blobs.has(digest):
        raise APIError(404, f"blob {digest} for {filename} was not uploaded")
    fmt = (wire.format or "auto").lower()
    if fmt not in FORMATS:
        raise APIError(400, f"format must be one of {', '.join(FORMATS)}")
    columns = wire.columns or {}
    if not all(isinstance(v, str) for v in columns.values()):
        raise APIError(400, "columns must map field names to CSV column names")
    options = dict(wire.parameters or {})
    if wire.method is not None:
        options["method"] = wire.method
    try:
        params = check_params(options)
    except TrainingError as exc:
        raise APIError(400, str(exc)) from None
    return FinetuneSpec(
        base=wire.from_,
        name=name.display(),
        data=Path(registry.blobs.path(digest)),
        data_name=filename,
        format=fmt,
        columns=dict(columns),
        params=params,
        resume=bool(wire.resume),
    )


@router.post("/api/finetune", openapi_extra=body(FinetuneRequestWire))
async def finetune(request: Request) -> Response:
    """Trains a LoRA / DoRA / IA3 adapter on a registry model (our extension): progress
    lines as /api/create's, plus the loss, tokens/s and ETA of each step; a client that
    disconnects stops the run (its checkpoint is kept for ``resume``)."""
    wire = parse(FinetuneRequestWire, await json_body(request))
    registry = registry_of(request)
    spec = finetune_spec(wire, registry)
    jobs = jobs_of(request)
    # refusals that need no weights (the base, the whole data file) answer before streaming
    await asyncio.to_thread(jobs.precheck_finetune, spec)
    cancel = threading.Event()
    settings = request.app.state.settings

    def run(report: Report) -> None:
        jobs.finetune(spec, report, cancel, settings.device, settings.dtype)

    return await progress_response(
        wire.stream, run, "fine-tuning failed", cancel=cancel, request=request
    )

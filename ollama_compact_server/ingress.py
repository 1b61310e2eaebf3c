"""What the Ray Serve ingress decides besides forwarding, without ray itself: a request's
multiplexed model id, the cap on the body it holds, and the deployment-wide /api/ps and
/metrics merged from every replica's answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .api.common import MAX_BODY_BYTES
from .api.errors import error_response
from .registry.errors import RegistryError
from .registry.names import ModelName
from .registry.store import Registry

BLOB_PREFIX = "/api/blobs/"  # streamed to the shared registry by the ingress itself
FANNED_OUT = {"/api/ps", "/metrics"}  # GETs every live replica answers; merged here
FAN_OUT_TIMEOUT = 5.0  # seconds a replica has to answer them; a later one is left out
REPLICA_LABEL = "replica"


class BodyTooLarge(Exception):
    pass


async def read_capped(chunks: AsyncIterator[bytes], declared: str | None) -> bytes:
    """The request body, counted as it arrives: past MAX_BODY_BYTES (the daemon's cap on
    JSON bodies), or a Content-Length saying so, raises BodyTooLarge without reading on."""
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


def too_large(path: str) -> Any:
    """The daemon's own answer to a JSON body past the cap (api/common.py), in the route's
    dialect."""
    return error_response(413, f"request body is larger than {MAX_BODY_BYTES >> 20} MiB", path)


def model_of(method: str, body: bytes) -> str:
    """The model a request names: the JSON body's ``model`` (or ``name``, as /api/show takes
    it) for POSTs; empty otherwise or when unreadable."""
    if method != "POST" or not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    model = data.get("model") or data.get("name") or ""
    return model if isinstance(model, str) else ""


def model_id(registry: Registry, method: str, body: bytes) -> str:
    """The multiplexed model id of a request: the registry's own name for the base model it
    runs on (``Pirate`` and ``pirate:latest`` are both ``pirate``; an adapter model is its
    base's id), so one resident base model is one id; empty (any replica, no id) for a name
    the registry lacks, which the replica answers with its 404. A flood of made-up names
    thus never churns the replicas' resident sets, and a replica's ids are exactly the base
    models its engine holds: an adapter goes where its base is and takes a slot there
    (milliseconds), instead of counting as a model of its own."""
    name = model_of(method, body)
    if not name or len(name) > 512:
        return ""
    try:
        stored = registry.resolve(ModelName.parse(name))
        if stored is None:
            return ""
        record = registry.get(stored)
        if record.is_adapter and record.config.base_model:
            base = registry.resolve(ModelName.parse(record.config.base_model))
            return base.display() if base is not None else ""
    except (RegistryError, ValueError, OSError):  # an invalid name, an unreadable folder
        return ""
    return stored.display()


def merge_ps(answers: list[dict[str, Any]]) -> bytes:
    """Every replica's resident models in one /api/ps answer, each entry with ``replica``
    (our field beside Ollama's: a model resident on two replicas is listed twice)."""
    models = []
    for answer in answers:
        for entry in json.loads(answer["body"]).get("models", []):
            models.append({**entry, REPLICA_LABEL: answer["replica"]})
    models.sort(key=lambda m: (str(m.get("name", "")), m[REPLICA_LABEL]))
    return json.dumps({"models": models}).encode()


def merge_metrics(answers: list[dict[str, Any]]) -> bytes:
    """Every replica's Prometheus text in one exposition, each series labelled
    ``replica="..."`` (summed, a gauge such as KV-cache use would mean nothing; Prometheus
    sums per-replica series itself: ``sum without (replica) (...)``)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for answer in answers:
        text = answer["body"].decode()
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: answer["replica"]}
                merged.samples.append(sample._replace(labels=labels))

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return bytes(generate_latest(registry))


def merge(path: str, answers: list[dict[str, Any]]) -> tuple[bytes, str]:
    """The merged body of a fanned-out GET and its media type."""
    if path == "/metrics":
        from prometheus_client import CONTENT_TYPE_LATEST

        return merge_metrics(answers), CONTENT_TYPE_LATEST
    return merge_ps(answers), "application/json"

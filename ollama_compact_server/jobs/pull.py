"""`/api/pull hf.co/ORG/REPO[:revision]`: lists the repository with huggingface_hub, streams
the safetensors (or GGUF) files it needs into a staging folder with size and sha256 checks,
then imports them; a failure at any point leaves the registry unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..registry.errors import InvalidModel, RegistryError
from ..registry.fsutil import check_free_space
from ..registry.importers import HF_FILES, PICKLE_SUFFIXES, import_hf_dir
from ..registry.manifest import check_filename
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from .importing import import_gguf

HUB_HOSTS = ("hf.co", "huggingface.co")
MAX_FILES = 256
CHUNK = 1 << 20
DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_FILE_BYTES = 64 << 30  # one file of a pull
MAX_TOTAL_BYTES = 256 << 30  # all files of a pull
MAX_REDIRECTS = 5

Progress = Callable[[dict[str, Any]], None]


class PullError(RegistryError):
    status = 502


def hub_repo(name: ModelName) -> tuple[str, str]:
    """(repo id, revision) for an hf.co name; the tag ``latest`` means ``main``."""
    if name.host.lower() not in HUB_HOSTS:
        raise InvalidModel(
            f"pulling '{name.display()}' is not supported: only Hugging Face repositories can be "
            "pulled, as hf.co/ORG/REPO[:revision]; or import local files with "
            "`ollama-compact import`"
        )
    revision = "main" if name.tag == "latest" else name.tag
    return f"{name.namespace}/{name.model}", revision


def _wanted(files: list[Any], revision: str) -> list[Any]:
    """The files to fetch: safetensors model files, or one GGUF; never pickle."""
    flat = [f for f in files if "/" not in f.path]
    weights = [f for f in flat if f.path.endswith(".safetensors")]
    if weights:
        return [f for f in flat if f.path.endswith(".safetensors") or f.path in HF_FILES]
    ggufs = [f for f in flat if f.path.lower().endswith(".gguf")]
    if ggufs:
        if len(ggufs) > 1:
            matching = [f for f in ggufs if revision.lower() in f.path.lower()]
            if len(matching) != 1:
                names = ", ".join(sorted(f.path for f in ggufs))[:300]
                raise InvalidModel(
                    f"the repository holds several GGUF files ({names}); name one as the tag"
                )
            return matching
        return ggufs
    if any(f.path.endswith(PICKLE_SUFFIXES) for f in flat):
        raise InvalidModel(
            "the repository only has pickle weights; only safetensors or GGUF can be pulled"
        )
    raise InvalidModel("the repository has no safetensors or GGUF weights")


def pull_model(registry: Registry, name: ModelName, progress: Progress) -> ModelRecord:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, revision = hub_repo(name)
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    progress({"status": "pulling manifest"})
    try:
        listing = list(
            HfApi(endpoint=endpoint).list_repo_tree(repo_id, revision=revision, recursive=True)
        )
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 404):
            raise InvalidModel(
                f"pull model manifest: {repo_id}@{revision} not found on the hub"
            ) from None
        raise PullError(f"pull model manifest: hub error {status}") from None
    except Exception as exc:  # connection errors (huggingface_hub's own httpx), offline mode
        raise PullError(
            f"pull model manifest: cannot reach the hub ({exc.__class__.__name__})"
        ) from None
    files = [f for f in listing if getattr(f, "size", None) is not None]
    if len(files) > MAX_FILES * 4:
        raise InvalidModel("the repository holds too many files")
    wanted = _wanted(files, revision)
    if len(wanted) > MAX_FILES:
        raise InvalidModel("the repository holds too many model files")
    with tempfile.TemporaryDirectory(prefix="ocs-pull-") as scratch:
        staging = Path(scratch)
        _check_sizes(wanted, staging, registry)
        hosts = _allowed_hosts(endpoint)
        with httpx.Client(timeout=httpx.Timeout(30.0, read=60.0), follow_redirects=False) as client:
            for entry in wanted:
                check_filename(entry.path)
                url = hf_hub_url(repo_id, entry.path, revision=revision, endpoint=endpoint)
                _download(client, url, staging / entry.path, entry, progress, hosts)
        progress({"status": "verifying sha256 digest"})
        source = {"kind": "huggingface", "ref": repo_id, "revision": revision, "endpoint": endpoint}
        aliases = [repo_id]
        ggufs = [e.path for e in wanted if e.path.lower().endswith(".gguf")]
        if ggufs:
            record = import_gguf(registry, staging / ggufs[0], name, source=source, aliases=aliases)
        else:
            record = import_hf_dir(registry, staging, name, source=source, aliases=aliases)
    progress({"status": "writing manifest"})
    return record


def _check_sizes(wanted: list[Any], staging: Path, registry: Registry) -> None:
    """Refuses a pull whose files, as the hub lists them, pass the caps or the free space
    (of the staging folder, and of the registry, which gets a copy), before any download;
    each download is then held to its listed size."""
    sizes = [int(entry.size) for entry in wanted]
    if any(size < 0 for size in sizes):
        raise PullError("the hub listed a file with a negative size")
    big = max(sizes, default=0)
    if big > MAX_FILE_BYTES:
        raise InvalidModel(f"a file of the repository is larger than {MAX_FILE_BYTES >> 30} GiB")
    total = sum(sizes)
    if total > MAX_TOTAL_BYTES:
        raise InvalidModel(f"the repository's model files pass {MAX_TOTAL_BYTES >> 30} GiB")
    for where in {staging, registry.root}:
        check_free_space(where, total, "the pull")


def _allowed_hosts(endpoint: str) -> tuple[str, ...]:
    """Hosts a download may be redirected to: the endpoint's own, and the hub's (its LFS
    and Xet storage live under hf.co and huggingface.co)."""
    own = httpx.URL(endpoint).host.lower()
    return (own, *HUB_HOSTS)


def _host_allowed(url: httpx.URL, hosts: tuple[str, ...]) -> bool:
    host = url.host.lower()
    return any(host == h or host.endswith("." + h) for h in hosts)


def _open(client: httpx.Client, url: str, hosts: tuple[str, ...]) -> httpx.Response:
    """GET ``url``, following redirects only to the hub's hosts (never to another host,
    nor from https to http)."""
    target = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(client.build_request("GET", target), stream=True)
        if not response.is_redirect:
            return response
        response.close()
        location = target.join(response.headers.get("location", ""))
        if not _host_allowed(location, hosts) or (
            target.scheme == "https" and location.scheme != "https"
        ):
            raise PullError(f"the hub redirected a download to another host ({location.host})")
        target = location
    raise PullError("the hub redirected a download too many times")


def _download(
    client: httpx.Client,
    url: str,
    target: Path,
    entry: Any,
    progress: Progress,
    hosts: tuple[str, ...],
) -> None:
    """Streams one file, checking its size and (for LFS files) its sha256."""
    expected_size = int(entry.size)
    expected_sha = getattr(getattr(entry, "lfs", None), "sha256", None)
    hasher = hashlib.sha256()
    digest_label = f"sha256:{expected_sha}" if expected_sha else f"sha256:{entry.blob_id}"
    status = f"pulling {digest_label[7:19]}"
    done = 0
    try:
        response = _open(client, url, hosts)
        with contextlib.closing(response):
            if response.status_code != 200:
                raise PullError(
                    f"download of {entry.path} failed: hub answered {response.status_code}"
                )
            with open(target, "wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    done += len(chunk)
                    if done > expected_size:
                        raise PullError(
                            f"{entry.path} is larger than the hub said ({expected_size} bytes)"
                        )
                    hasher.update(chunk)
                    handle.write(chunk)
                    progress(
                        {
                            "status": status,
                            "digest": digest_label,
                            "total": expected_size,
                            "completed": done,
                        }
                    )
    except httpx.HTTPError as exc:
        raise PullError(f"download of {entry.path} failed: {exc.__class__.__name__}") from None
    if done != expected_size:
        raise PullError(f"download of {entry.path} is incomplete ({done} of {expected_size} bytes)")
    if expected_sha and hasher.hexdigest() != expected_sha:
        raise PullError(f"digest mismatch for {entry.path}")

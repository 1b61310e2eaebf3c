"""Container health check: GET /ready on the daemon inside this container, with the API key
when one is set. Standard library only; exit 0 when ready, 1 otherwise."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def port_of(host: str) -> int:
    """The port of an OLLAMA_HOST value ([scheme://]host[:port]); 11434 when none is given."""
    rest = host.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):  # [ipv6]:port
        tail = rest.rsplit("]", 1)[-1]
        return int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else 11434
    _, _, port = rest.rpartition(":")
    return int(port) if port.isdigit() else 11434


def main() -> int:
    port = port_of(os.environ.get("OLLAMA_HOST", ""))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/ready")
    key = os.environ.get("OCS_API_KEY", "").strip()
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:  # noqa: S310 (fixed URL)
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

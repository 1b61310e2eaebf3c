#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim where no image registry can be reached: Debian
# bookworm (minbase, from a Debian mirror) with its Python 3.11, venv, `python` and useradd,
# imported as an image. Pass it to the build as PYTHON_IMAGE:
#   sudo docker/make-base-image.sh                   # -> ocs-python:3.11
#   docker build --build-arg PYTHON_IMAGE=ocs-python:3.11 --target cpu -t ollama-compact-server:cpu .
# docker/smoke-test.sh calls this itself when it is given no PYTHON_IMAGE and cannot pull
# python:3.11-slim. Needs root, debootstrap (apt-get install debootstrap) and a docker daemon.
# Environment: BASE_SUITE (bookworm: its python3 is 3.11), BASE_MIRROR (the Debian mirror).
set -euo pipefail

tag=${1:-ocs-python:3.11}
suite=${BASE_SUITE:-bookworm}
mirror=${BASE_MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || {
    echo "make-base-image: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 2
}
[ "$(id -u)" = 0 ] || { echo "make-base-image: debootstrap needs root" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/tmp}/ocs-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$root"' EXIT

started=$(date +%s)
# python3-venv: `python -m venv` (with ensurepip's pip); python-is-python3: `python`;
# passwd: useradd; ca-certificates: as in python:3.11-slim. apt-get works inside (the build
# stage installs gcc from the same mirror).
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,passwd,ca-certificates \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$root" -c . |
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "debootstrap $suite minbase + python3 (docker/make-base-image.sh)" - "$tag" >/dev/null
docker run --rm --network none "$tag" python -c "import ensurepip, venv, sys; print(sys.version)" >/dev/null
echo "make-base-image: $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)," \
    "$(($(date +%s) - started)) s)"

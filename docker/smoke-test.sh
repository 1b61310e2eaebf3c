#!/usr/bin/env bash
# Smoke test of the images: builds the CPU image, starts it with docker compose, waits for
# (healthy), chats through the published port with the official `ollama` Python client,
# restarts the container (the models volume must keep the model: no second import) and stops
# it with `docker compose down`; it also builds the CUDA target (build only, right after the
# CPU image). Cleans up after itself (its own compose project, container, network, volume and
# wheels image) and prints the time of each phase. Exit status: 0 passed, 1 failed, 75 another
# run of the same project is in progress. tests/test_docker_smoke.py runs it wherever a docker
# daemon is reachable.
#
#   docker/smoke-test.sh                       # machines that reach Docker Hub and PyTorch
#   SMOKE_WHEELS=/opt/wheels SMOKE_PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
#     SMOKE_TORCH_INDEX_URL=https://pypi.org/simple docker/smoke-test.sh   # offline-ish
#
# Environment (all optional):
#   PYTHON_IMAGE           base image. Default: python:3.11-slim if present or pullable, else
#                          ocs-python:3.11, made by docker/make-base-image.sh when missing
#                          (needs root and debootstrap)
#   SMOKE_WHEELS           folder of wheels pip considers beside the indexes (torch CPU wheel);
#                          imported as an image and passed as WHEELS_IMAGE. Default: none
#   SMOKE_PIP_CERT         CA bundle (a host file) pip trusts inside the build; travels with
#                          the wheels and is passed as PIP_CERT. Default: none
#   SMOKE_TORCH_INDEX_URL  TORCH_INDEX_URL for the build. Default: the Dockerfile's (PyTorch
#                          CPU index); with SMOKE_WHEELS and no PyTorch index reachable:
#                          https://pypi.org/simple (torch's dependencies from PyPI)
#   SMOKE_BUILD_NETWORK    `docker build --network` (e.g. host). Default: docker's own
#   SMOKE_PORT             host port on 127.0.0.1. Default: 11434 when free, else a free one
#   SMOKE_PROJECT          compose project name. Default: ocs-smoke
#   SMOKE_IMAGE            tag of the CPU image. Default: ollama-compact-server:smoke-cpu
#   SMOKE_CUDA             1: also build the cuda target (build check only, same torch). Default: 1
#   SMOKE_KEEP_IMAGES      1: keep the built CPU image (the next run builds from its cache);
#                          0: remove it at the end. Default: 1
#   SMOKE_HEALTH_TIMEOUT   seconds to wait for (healthy). Default: 420 (start period 300 s)
#   SMOKE_PYTHON           Python with the `ollama` package. Default: .venv/bin/python, python3
#   SMOKE_LOG_DIR          where build and container logs go. Default: a new folder in /tmp
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROJECT=${SMOKE_PROJECT:-ocs-smoke}
IMAGE=${SMOKE_IMAGE:-ollama-compact-server:smoke-cpu}
CUDA_IMAGE=${IMAGE%:*}:smoke-cuda
[ "$CUDA_IMAGE" != "$IMAGE" ] || CUDA_IMAGE=$IMAGE-cuda
WHEELS_TAG=ocs-smoke-wheels:$PROJECT
BUILD_CUDA=${SMOKE_CUDA:-1}
KEEP_IMAGES=${SMOKE_KEEP_IMAGES:-1}
HEALTH_TIMEOUT=${SMOKE_HEALTH_TIMEOUT:-420}
LOG_DIR=${SMOKE_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ocs-smoke.XXXXXX")}
mkdir -p "$LOG_DIR"
if [ -n "${SMOKE_PYTHON:-}" ]; then PY=$SMOKE_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
SERVICE=ollama-compact
MODEL=gemma3:270m
IMPORT_LINE="importing the default model"

say() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

TIMINGS=()
phase_start() { PHASE=$1; PHASE_T0=$(date +%s); say "== $PHASE"; }
phase_end() {
    local took=$(($(date +%s) - PHASE_T0))
    TIMINGS+=("$(printf '%-28s %5d s' "$PHASE" "$took")")
    say "   $PHASE: ${took} s${1:+ ($1)}"
}

compose() {
    SMOKE_IMAGE=$IMAGE SMOKE_PORT=$PORT docker compose -p "$PROJECT" \
        --project-directory "$REPO" -f "$REPO/docker-compose.yml" \
        -f "$REPO/docker/compose.smoke.yml" --profile cpu "$@"
}

# one run per project name at a time (a second would tear down the first's containers);
# exit 75 says another run holds the lock
if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/$PROJECT.smoke.lock"
    flock -n 9 || { say "another smoke test of project $PROJECT is running"; exit 75; }
fi

UP=0
PASSED=0
cleanup() {
    local rc=$?
    set +e
    if [ "$UP" = 1 ]; then
        if [ "$PASSED" != 1 ]; then
            say "container logs (last 60 lines; all in $LOG_DIR/container.log):"
            compose logs --no-color >"$LOG_DIR/container.log" 2>&1
            tail -60 "$LOG_DIR/container.log"
        fi
        compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    docker image rm "$WHEELS_TAG" >/dev/null 2>&1
    docker image rm "$CUDA_IMAGE" >/dev/null 2>&1
    [ "$KEEP_IMAGES" = 1 ] || docker image rm "$IMAGE" >/dev/null 2>&1
    if [ ${#TIMINGS[@]} -gt 0 ]; then
        say "timings:"
        printf '    %s\n' "${TIMINGS[@]}"
    fi
    if [ "$PASSED" = 1 ]; then say "smoke test passed (logs: $LOG_DIR)"
    else say "smoke test FAILED, exit $rc (logs: $LOG_DIR)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() { "$PY" -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError: sys.exit(1)' "$1"; }

container_id() { compose ps -q "$SERVICE"; }

# wait_healthy LABEL: polls the container's health until healthy; fails if it stops or times out
wait_healthy() {
    local cid status state waited=0
    cid=$(container_id)
    [ -n "$cid" ] || fail "no container for $SERVICE"
    while :; do
        state=$(docker inspect -f '{{.State.Status}}' "$cid")
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
        [ "$status" = healthy ] && break
        case $state in running | created) ;; *) fail "container is $state (health: $status)" ;; esac
        [ "$waited" -lt "$HEALTH_TIMEOUT" ] || fail "not healthy after ${HEALTH_TIMEOUT} s ($status)"
        sleep 5
        waited=$((waited + 5))
    done
    compose ps --format '{{.Name}}  {{.Status}}' | sed 's/^/    /'
    compose ps --format '{{.Status}}' | grep -q '(healthy)' || fail "compose ps does not say (healthy)"
}

# client MODE: the ollama client through the published port; prints one JSON line
client() {
    "$PY" - "$1" "http://127.0.0.1:$PORT" "$MODEL" <<'EOF'
import json, sys, time
import ollama

mode, host, model = sys.argv[1:4]
client = ollama.Client(host=host, timeout=300)
listed = {m.model: m for m in client.list().models}
if model not in listed:
    sys.exit(f"{model} not listed by /api/tags: {sorted(listed)}")
started = time.monotonic()
reply = client.chat(
    model=model,
    messages=[{"role": "user", "content": "Say hello in one short sentence."}],
    options={"num_predict": 24, "temperature": 0},
)
text = reply.message.content or ""
if not text.strip():
    sys.exit(f"empty reply: {reply!r}")
print(json.dumps({
    "modified_at": str(listed[model].modified_at),
    "chat_s": round(time.monotonic() - started, 2),
    "eval_count": reply.eval_count,
    "reply": text.strip()[:120],
}))
EOF
}

json_field() { "$PY" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# ------------------------------------------------------------------------------ preflight
phase_start preflight
command -v docker >/dev/null || fail "docker CLI not found"
docker info >/dev/null 2>&1 || fail "no docker daemon reachable (docker info failed)"
docker compose version >/dev/null 2>&1 || fail "the docker compose v2 plugin is missing"
"$PY" -c 'import ollama' 2>/dev/null || fail "$PY has no 'ollama' package (set SMOKE_PYTHON)"
if [ -n "${SMOKE_PORT:-}" ]; then PORT=$SMOKE_PORT
elif port_free 11434; then PORT=11434
else PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
port_free "$PORT" || fail "127.0.0.1:$PORT is in use (set SMOKE_PORT)"
say "   docker $(docker version -f '{{.Server.Version}}'), $(docker compose version --short 2>/dev/null | sed 's/^/compose /'), port $PORT, project $PROJECT, logs $LOG_DIR"
# leftovers of an interrupted run of this project
compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
phase_end

# ------------------------------------------------------------------------------ base image
phase_start base-image
if [ -n "${PYTHON_IMAGE:-}" ]; then
    BASE=$PYTHON_IMAGE
elif docker image inspect python:3.11-slim >/dev/null 2>&1 ||
    timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    BASE=python:3.11-slim
else
    BASE=ocs-python:3.11
    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        say "   python:3.11-slim cannot be pulled: making $BASE (docker/make-base-image.sh)"
        "$REPO/docker/make-base-image.sh" "$BASE"
    fi
fi
phase_end "$BASE"

BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$BASE")
[ -z "${SMOKE_BUILD_NETWORK:-}" ] || BUILD_ARGS+=(--network "$SMOKE_BUILD_NETWORK")
[ -z "${SMOKE_TORCH_INDEX_URL:-}" ] || BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$SMOKE_TORCH_INDEX_URL")

# ------------------------------------------------------------------------------ wheels
if [ -n "${SMOKE_WHEELS:-}" ] || [ -n "${SMOKE_PIP_CERT:-}" ]; then
    phase_start wheels-image
    sources=()
    if [ -n "${SMOKE_WHEELS:-}" ]; then
        [ -d "$SMOKE_WHEELS" ] || fail "SMOKE_WHEELS=$SMOKE_WHEELS is not a folder"
        sources+=(-C "$SMOKE_WHEELS" .)
    fi
    if [ -n "${SMOKE_PIP_CERT:-}" ]; then
        [ -f "$SMOKE_PIP_CERT" ] || fail "SMOKE_PIP_CERT=$SMOKE_PIP_CERT is not a file"
        # -h: the bundle itself, should the path be a link
        sources+=(-h -C "$(dirname "$SMOKE_PIP_CERT")" "$(basename "$SMOKE_PIP_CERT")")
        BUILD_ARGS+=(--build-arg "PIP_CERT=/wheels/$(basename "$SMOKE_PIP_CERT")")
    fi
    tar -c "${sources[@]}" | docker import - "$WHEELS_TAG" >/dev/null || fail "docker import of the wheels"
    BUILD_ARGS+=(--build-arg "WHEELS_IMAGE=$WHEELS_TAG")
    phase_end "$(docker image inspect -f '{{.Size}}' "$WHEELS_TAG" | numfmt --to=iec) from ${SMOKE_WHEELS:-} ${SMOKE_PIP_CERT:-}"
fi

# ------------------------------------------------------------------------------ build
device_of() { docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$1" | sed -n 's/^OCS_DEVICE=//p'; }
build() { # build TARGET TAG LOG
    # --force-rm: no intermediate container is left behind, not even by an interrupted build
    if ! docker build --force-rm "${BUILD_ARGS[@]}" --target "$1" -t "$2" "$REPO" >"$3" 2>&1; then
        tail -40 "$3"
        fail "docker build --target $1 (log: $3)"
    fi
}
phase_start build-cpu
say "   docker build --force-rm ${BUILD_ARGS[*]} --target cpu -t $IMAGE ."
build cpu "$IMAGE" "$LOG_DIR/build-cpu.log"
[ "$(device_of "$IMAGE")" = cpu ] || fail "$IMAGE does not set OCS_DEVICE=cpu"
phase_end "$(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"

# ------------------------------------------------------------------------------ cuda
# build only, right after the CPU image (so from its cache); the same torch as the CPU image
if [ "$BUILD_CUDA" = 1 ]; then
    phase_start build-cuda
    build cuda "$CUDA_IMAGE" "$LOG_DIR/build-cuda.log"
    [ "$(device_of "$CUDA_IMAGE")" = cuda ] || fail "$CUDA_IMAGE does not set OCS_DEVICE=cuda"
    phase_end "build check only: not run; its torch is the one TORCH_INDEX_URL gave"
fi

# ------------------------------------------------------------------------------ up, healthy, chat
phase_start "up + healthy (first start)"
UP=1
compose up -d --no-build --pull never >"$LOG_DIR/up.log" 2>&1 || { cat "$LOG_DIR/up.log"; fail "docker compose up"; }
wait_healthy
phase_end

# the int8 / int4 kernels compiled in the build stage load for the runtime's user
kernels=$(compose exec -T "$SERVICE" python -c "from ollama_compact_server.modeling import cpu_kernels as k
print('loaded' if k.get() else k.reason())" 2>/dev/null) || fail "docker compose exec"
case $kernels in
loaded) say "   prebuilt CPU kernels: loaded" ;;
*"lacks AVX2"*) say "   prebuilt CPU kernels: not used here ($kernels)" ;;
*) fail "the image's prebuilt CPU kernels do not load: $kernels" ;;
esac

phase_start chat
first=$(client chat) || fail "chat through 127.0.0.1:$PORT"
say "   $first"
phase_end

imports=$(compose logs --no-color "$SERVICE" 2>&1 | grep -c "$IMPORT_LINE" || true)
[ "$imports" = 1 ] || fail "expected one import of the default model on the first start, saw $imports"

# ------------------------------------------------------------------------------ restart
phase_start "restart + healthy"
cid=$(container_id)
before=$(docker inspect -f '{{.State.StartedAt}}' "$cid")
compose restart >"$LOG_DIR/restart.log" 2>&1 || { cat "$LOG_DIR/restart.log"; fail "docker compose restart"; }
[ "$(docker inspect -f '{{.State.StartedAt}}' "$cid")" != "$before" ] || fail "the container did not restart"
wait_healthy
phase_end

phase_start "chat after restart"
second=$(client chat) || fail "chat after the restart"
say "   $second"
phase_end
imports=$(compose logs --no-color "$SERVICE" 2>&1 | grep -c "$IMPORT_LINE" || true)
[ "$imports" = 1 ] || fail "the restart imported the default model again ($imports imports in the logs)"
[ "$(json_field "$first" modified_at)" = "$(json_field "$second" modified_at)" ] ||
    fail "the model's modified time changed across the restart"
say "   the models volume kept $MODEL: one import in the logs, modified_at unchanged"

# ------------------------------------------------------------------------------ down
compose logs --no-color >"$LOG_DIR/container.log" 2>&1 || true
phase_start down
compose down >"$LOG_DIR/down.log" 2>&1 || { cat "$LOG_DIR/down.log"; fail "docker compose down"; }
[ -z "$(compose ps -aq)" ] || fail "containers left after docker compose down"
phase_end

PASSED=1

# ollama-compact-server images: one Dockerfile, two targets.
#   CPU  (default):  docker build --target cpu -t ollama-compact-server:cpu .
#   CUDA:            docker build --target cuda -t ollama-compact-server:cuda \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The build argument picks the torch wheels (a cuda image with CPU torch refuses to start);
# the CUDA build of torch brings its CUDA libraries as wheels, so both targets run on
# the same slim Python base; the host needs only the NVIDIA driver and container toolkit
# (docker-compose.yml's `cuda` profile reserves the GPU).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: a venv in /opt/venv
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the index of the chosen variant (its own layer: it rarely changes)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md constraints.txt ./
COPY ollama_compact_server ./ollama_compact_server
RUN pip install -c constraints.txt ".[default-model]"
# our int8 / int4 CPU kernels, compiled here so the slim runtime needs no compiler (on a CPU
# without AVX2, or if this fails, the daemon uses torch's kernels and says so)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && OCS_KERNEL_CACHE=/opt/ocs-kernels python -c \
    "from ollama_compact_server.modeling import cpu_kernels as k; k.get() or print(k.reason())" \
 && mkdir -p /opt/ocs-kernels

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
# Inside the container the daemon listens on all interfaces of the container (OLLAMA_HOST);
# it refuses to start that way unless OCS_API_KEY is set, or OCS_INSECURE_NO_AUTH=true says the
# network is trusted (docker-compose.yml sets that and publishes the port on the host's
# 127.0.0.1 only). The image itself sets neither.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    OLLAMA_HOST=0.0.0.0:11434 OCS_MODELS=/data/models OCS_ADAPTERS=/data/adapters \
    OCS_KERNEL_CACHE=/opt/ocs-kernels HOME=/home/ocs
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin ocs \
 && mkdir -p /data/models /data/adapters \
 && chown -R ocs:ocs /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/ocs-kernels /opt/ocs-kernels
COPY docker/entrypoint.sh /entrypoint.sh
COPY docker/healthcheck.py /healthcheck.py
USER ocs
WORKDIR /home/ocs
VOLUME ["/data/models", "/data/adapters"]
EXPOSE 11434
# Ready = the engine runs and the default model is in the registry; stdlib only (no curl).
# The first start imports the default model before listening (a minute or more): start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/healthcheck.py"]
# SIGTERM: stop accepting, let running streams finish (OCS_SHUTDOWN_TIMEOUT, default 30 s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["/entrypoint.sh"]

# ---------------------------------------------------------------- targets
# (no RUN here: the legacy builder builds every stage before the one asked for, and `cpu`
# comes after this one; a cuda image built with CPU torch says so at start and exits 2)
FROM runtime AS cuda
ENV OCS_DEVICE=cuda

# last, so a plain `docker build .` gives the CPU image
FROM runtime AS cpu
ENV OCS_DEVICE=cpu

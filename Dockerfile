# ollama-compact-server images: one Dockerfile, two targets.
#   CPU  (default):  docker build --target cpu -t ollama-compact-server:cpu .
#   CUDA:            docker build --target cuda -t ollama-compact-server:cuda \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The build argument picks the torch wheels (a cuda image with CPU torch refuses to start);
# the CUDA build of torch brings its CUDA libraries as wheels, so both targets run on
# the same slim Python base; the host needs only the NVIDIA driver and container toolkit
# (docker-compose.yml's `cuda` profile reserves the GPU).
#
# Without a registry (offline, or behind a TLS-inspecting proxy), three more build arguments;
# the defaults change nothing:
#   PYTHON_IMAGE   the base image (python:3.11-slim); docker/make-base-image.sh makes a stand-in
#                  from a Debian mirror: --build-arg PYTHON_IMAGE=ocs-python:3.11
#   WHEELS_IMAGE   an image whose files are wheels pip considers beside the indexes
#                  (pip --find-links /wheels), torch's above all; none by default. From a folder:
#                    tar -C DIR -c . | docker import - ocs-wheels:local
#                    --build-arg WHEELS_IMAGE=ocs-wheels:local
#                  (BuildKit/buildx can skip the image: --build-context wheels=DIR). With torch
#                  from the folder and no PyTorch index reachable, point TORCH_INDEX_URL at PyPI
#                  (https://pypi.org/simple) for torch's own dependencies: the folder's
#                  torch==X+cpu outranks PyPI's torch==X.
#   PIP_CERT       the CA bundle pip trusts, as a path inside the build: put the bundle in the
#                  wheels folder and pass e.g. PIP_CERT=/wheels/ca-certificates.crt
# docker/smoke-test.sh takes all of these from environment variables (see its header).

ARG PYTHON_IMAGE=python:3.11-slim
ARG WHEELS_IMAGE=scratch

# ---------------------------------------------------------------- wheels: none unless given
FROM ${WHEELS_IMAGE} AS wheels

# ---------------------------------------------------------------- build: a venv in /opt/venv
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# unset unless given (pip reads it from the environment)
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# local wheels for pip's --find-links (WHEELS_IMAGE; an empty folder by default)
COPY --from=wheels / /wheels/
# torch first, from the index of the chosen variant (its own layer: it rarely changes)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" --find-links /wheels
COPY pyproject.toml README.md constraints.txt ./
COPY ollama_compact_server ./ollama_compact_server
RUN pip install -c constraints.txt --find-links /wheels ".[default-model]"
# our int8 / int4 CPU kernels, compiled here so the slim runtime needs no compiler (on a CPU
# without AVX2, or if this fails, the daemon uses torch's kernels and says so); the cache is
# written for its owner (root) only, and the runtime's user must read it
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && OCS_KERNEL_CACHE=/opt/ocs-kernels python -c \
    "from ollama_compact_server.modeling import cpu_kernels as k; k.get() or print(k.reason())" \
 && mkdir -p /opt/ocs-kernels && chmod -R a+rX /opt/ocs-kernels

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

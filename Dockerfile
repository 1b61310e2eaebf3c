# Minimal image for now; the deployment issue (issue 7) adds the CUDA target, non-root user
# hardening and healthchecks.
FROM python:3.11-slim AS cpu
# Inside the container the daemon listens on all interfaces; docker-compose.yml publishes the
# port on the host's 127.0.0.1 only. Set OCS_API_KEY before publishing it more widely.
ENV PYTHONUNBUFFERED=1 OLLAMA_HOST=0.0.0.0:11434 OCS_INSECURE_NO_AUTH=true \
    OCS_MODELS=/data/models OCS_ADAPTERS=/data/adapters
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ollama_compact_server ./ollama_compact_server
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[default-model]"
RUN useradd --create-home --uid 1000 ocs && mkdir -p /data/models /data/adapters && chown -R ocs /data
USER ocs
VOLUME ["/data/models", "/data/adapters"]
EXPOSE 11434
COPY docker/entrypoint.sh /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]

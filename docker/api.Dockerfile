# The api: validates, queues in Redis, answers. No torch, no onnxruntime (a few hundred MB,
# not several GB): everything heavy happens in a worker.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY models models
RUN pip install --no-deps . && useradd --system --uid 10001 cvserve

USER cvserve
# Several api processes share one /metrics through this folder (docs/design.md §6).
ENV CVSERVE_HOST=0.0.0.0 CVSERVE_PORT=8000 CVSERVE_GRPC_PORT=8001 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/cvserve-metrics
EXPOSE 8000 8001
CMD ["cvserve", "api", "--workers", "2"]

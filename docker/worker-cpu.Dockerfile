# The CPU worker (`docker compose --profile cpu up`): PyTorch's CPU wheels, not the
# CUDA build PyPI serves by default (GBs of CUDA libraries with no GPU to use them).
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY models models
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu .

RUN useradd --system --uid 10001 cvserve && mkdir /models && chown cvserve /models
USER cvserve
ENV CVSERVE_HOST=0.0.0.0 CVSERVE_MODEL_REPOSITORY=/models CVSERVE_DEVICE=cpu \
    CVSERVE_WORKER_METRICS_PORT=9101 TORCH_HOME=/models/.cache/torch
EXPOSE 9101
CMD ["cvserve", "worker"]

# The GPU worker: torch and onnxruntime-gpu on NVIDIA's CUDA runtime with cuDNN.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY models models
# pyproject's onnxruntime is the CPU build; the GPU build replaces it (both install the
# same `onnxruntime` module, so only one may be present).
RUN pip install . \
 && pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu>=1.17"

RUN useradd --system --uid 10001 cvserve && mkdir /models && chown cvserve /models
USER cvserve
ENV CVSERVE_HOST=0.0.0.0 CVSERVE_MODEL_REPOSITORY=/models CVSERVE_DEVICE=auto \
    CVSERVE_WORKER_METRICS_PORT=9101 TORCH_HOME=/models/.cache/torch
EXPOSE 9101
CMD ["cvserve", "worker"]

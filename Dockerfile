# syntax=docker/dockerfile:1
# Two stages. The builder installs the export extra (torch) exactly as the README's `make demo` does and
# prepares the default model bundle; the runtime installs only `xmodal[cpu]` (no torch) and copies the
# bundle in. The CUDA image (compose profile `gpu`) is the same runtime with EXTRAS=gpu: onnxruntime-gpu and
# faiss-gpu bring their CUDA libraries as wheels; the driver comes from the host (NVIDIA container toolkit).
# EXTRAS=cpu,ray adds Ray Data for `xmodal index build|add --engine ray` (about 500 MB; see docs/operations.md).

FROM python:3.11-slim AS builder
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY models models
COPY indexer indexer
COPY service service
RUN make install EXTRAS=cpu,export VENV=/opt/export-venv
RUN XMODAL_MODELS_DIR=/opt/xmodal/models /opt/export-venv/bin/xmodal models prepare

FROM python:3.11-slim AS runtime
ARG EXTRAS=cpu
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home xmodal \
    && mkdir -p /data && chown xmodal:xmodal /data
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY models models
COPY indexer indexer
COPY service service
RUN make install EXTRAS=${EXTRAS} VENV=/opt/venv
COPY --from=builder /opt/xmodal/models /opt/xmodal/models
ENV PATH=/opt/venv/bin:$PATH \
    XMODAL_DATA_DIR=/data \
    XMODAL_MODELS_DIR=/opt/xmodal/models \
    XMODAL_HOST=0.0.0.0 \
    XMODAL_PORT=8000
USER xmodal
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["xmodal", "serve"]

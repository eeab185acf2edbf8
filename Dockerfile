# One image for every step of the pipeline (KFP components, the MLflow server, PyTorchJob workers).
# CUDA-capable PyTorch: the cu130 wheels bundle the CUDA runtime, so a slim Python base is enough and the
# host only needs an NVIDIA driver (the GPU operator / device plugin on Kubernetes).
# Build: atmask image build --repository REGISTRY/atmask   (tags with the git commit)

FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91 AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Largest layer first, it changes least: torch/torchvision pinned like pyproject.toml, CUDA 13.0 builds.
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY components/ components/
COPY pipelines/ pipelines/
# The project with its pinned dependencies, plus the Postgres driver for the MLflow server (k8s/).
RUN pip install ./ psycopg2-binary==2.9.10

FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
LABEL org.opencontainers.image.title="atmask" \
      org.opencontainers.image.description="ATMask R-CNN: train, evaluate, register (CLI: atmask)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 atmask \
    && useradd --system --uid 10001 --gid atmask --create-home --home-dir /home/atmask atmask
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/atmask \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba
WORKDIR /home/atmask
USER 10001:10001
# Batch jobs and the MLflow server are probed by Kubernetes (k8s/), not by the Docker engine.
HEALTHCHECK NONE
ENTRYPOINT ["atmask"]
CMD ["--help"]

# Two images from one Dockerfile; build them with `atmask image build` (README "Container image"), which
# runs BuildKit (`RUN --mount` below needs it) with these inputs:
#   --target atmask (default)  every pipeline step: the KFP components, the PyTorchJob workers, the CLI
#   --target mlflow            the MLflow tracking server of k8s/base/mlflow.yaml: no torch, no CUDA
#   BASE_IMAGE        Debian bookworm with Python 3.11 and its venv module; the default is the official slim
#                     image pinned by digest, `bash .ci/docker.sh base` makes one from Debian's packages
#   TORCH_INDEX_URL   where torch/torchvision come from: PyTorch's CUDA 13.0 index, or PyPI (same CUDA 13.0
#                     builds); the wheels bundle the CUDA runtime, the host only needs an NVIDIA driver
#   secret "ca"       optional CA bundle for pip behind a TLS-inspecting proxy; mounted per step, never stored
#   wheelhouse/       optional wheels in the build context: pip installs from them only (offline build)
# Every dependency version comes from constraints.txt, the versions the test suite ran with.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM scratch AS wheelhouse
COPY wheelhouse* /

# checkov:skip=CKV_DOCKER_7:the base is a build argument; its default above is pinned by digest
FROM ${BASE_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 atmask \
    && useradd --system --uid 10001 --gid atmask --create-home --home-dir /home/atmask atmask \
    && python3 -m venv /opt/venv

# Every pip step mounts the CA secret (when given), the wheelhouse, container/pip-env.sh (which uses both)
# and a download cache that stays in BuildKit (a rebuild does not fetch torch again), not in the image.
FROM base AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Largest layer first, it changes least: torch and torchvision with the CUDA libraries they pin.
RUN --mount=type=secret,id=ca \
    --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=container/pip-env.sh,target=/tmp/pip-env.sh \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    . /tmp/pip-env.sh \
    && pip install --index-url "$TORCH_INDEX_URL" -c /tmp/constraints.txt torch torchvision
# The project's dependencies as pyproject.toml lists them, at constraints.txt's versions; no project code
# yet, so a change under components/ reuses this layer.
RUN --mount=type=secret,id=ca \
    --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=container/pip-env.sh,target=/tmp/pip-env.sh \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    . /tmp/pip-env.sh \
    && python3 -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    | pip install -c /tmp/constraints.txt -r /dev/stdin

FROM venv AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY components/ components/
COPY pipelines/ pipelines/
RUN --mount=type=secret,id=ca \
    --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=container/pip-env.sh,target=/tmp/pip-env.sh \
    . /tmp/pip-env.sh \
    && pip wheel --no-deps --wheel-dir /dist .

# The tracking server exactly as k8s/base/mlflow.yaml runs it: basic auth (Flask-WTF), PostgreSQL backend
# store (psycopg 3, SQLAlchemy 2.1's driver for postgresql:// URIs), S3 artifacts (boto3); wait_for_db.py
# is its init container. The three packages constraints.txt does not know are pinned here.
FROM base AS mlflow
RUN --mount=type=secret,id=ca \
    --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=container/pip-env.sh,target=/tmp/pip-env.sh \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    . /tmp/pip-env.sh \
    && pip install -c /tmp/constraints.txt mlflow boto3 \
        "psycopg[binary]==3.3.9" Flask-WTF==1.3.0 WTForms==3.3.2
COPY container/wait_for_db.py /opt/mlflow/wait_for_db.py
LABEL org.opencontainers.image.title="atmask-mlflow" \
      org.opencontainers.image.description="MLflow tracking server for ATMask R-CNN (basic auth, PostgreSQL, S3)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV HOME=/tmp
WORKDIR /tmp
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["mlflow"]
CMD ["--help"]

FROM venv AS atmask
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps --no-index /dist/atmask-*.whl
LABEL org.opencontainers.image.title="atmask" \
      org.opencontainers.image.description="ATMask R-CNN: train, evaluate, register (CLI: atmask)" \
      org.opencontainers.image.licenses="Apache-2.0"
# no git in the image: MLflow's GitPython probe stays quiet (runs record the commit as "unknown")
ENV HOME=/home/atmask \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    GIT_PYTHON_REFRESH=quiet
WORKDIR /home/atmask
USER 10001:10001
# Batch jobs and the MLflow server are probed by Kubernetes (k8s/), not by the Docker engine.
HEALTHCHECK NONE
ENTRYPOINT ["atmask"]
CMD ["--help"]

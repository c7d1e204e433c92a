# syntax=docker/dockerfile:1
# Training image: the locked Python environment plus this repository; nothing is cloned at run time.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t dermaid-training .   # CPU (default target)
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t dermaid-training-gpu --target gpu .
#   docker build --build-arg PIP_INDEX_URL="$PIP_INDEX_URL" -t dermaid-training .   # another index
#   docker run --rm dermaid-training PROJECT BUCKET - - dataset_v02 1 -- -e 20
#
# docker-shell.sh builds and runs it with secrets mounted; tools/vertex_submit.py runs it on Vertex AI.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base

# Empty means "pip's own default index"; the Pipfile's source is ${PIP_INDEX_URL}, so it must be set
# while pipenv runs. ARG values are kept in the image history: never put credentials in it. An
# authenticated index goes in a BuildKit secret instead (it wins over the ARG and is never stored):
#   docker build --secret id=pip_index_url,env=PIP_INDEX_URL .
ARG PIP_INDEX_URL
ARG PIPENV_VERSION=2026.10.3
# uid of the runtime user: docker-shell.sh passes the host uid so that a bind-mounted secrets/
# folder with mode 0600 stays readable inside the container.
ARG APP_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIPENV_VERBOSITY=-1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git: `dvc get` clones the data registry. The 2.39 series is what bookworm ships; pinning the series
# rather than the full Debian revision keeps security updates without breaking the build when the
# archive drops an old revision (the base image tag pins the distribution itself).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# The lock alone decides the environment (--deploy fails if Pipfile and lock disagree); pipenv is
# removed afterwards because nothing needs it at run time.
COPY Pipfile Pipfile.lock ./
RUN --mount=type=secret,id=pip_index_url,required=false \
    index_url="$(cat /run/secrets/pip_index_url 2>/dev/null || true)"; \
    index_url="${index_url:-${PIP_INDEX_URL:-$(python -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}}"; \
    export PIP_INDEX_URL="${index_url}" \
    && pip install "pipenv==${PIPENV_VERSION}" \
    && pipenv install --deploy --system \
    && pip uninstall -y pipenv

RUN groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid app --shell /usr/sbin/nologin app

# ---------------------------------------------------------------------------------------------
# GPU variant. CUDA and cuDNN come as pip wheels through TensorFlow's `and-cuda` extra, so the
# image needs no CUDA base: only the host's NVIDIA driver (docker run --gpus all, or a Vertex AI
# accelerator). These wheels are NOT in Pipfile.lock: they are resolved at build time against the
# same tensorflow==2.21.0 pin, without hash checking.
FROM base AS gpu
ARG PIP_INDEX_URL
ARG APP_UID=1000
RUN --mount=type=secret,id=pip_index_url,required=false \
    index_url="$(cat /run/secrets/pip_index_url 2>/dev/null || true)"; \
    index_url="${index_url:-${PIP_INDEX_URL:-$(python -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}}"; \
    PIP_INDEX_URL="${index_url}" pip install "tensorflow[and-cuda]==2.21.0"
COPY . .
# The code stays root-owned (read-only for the job); the working directory is the job's, for
# Versioning/, the shard cache, wandb/ and local outputs.
RUN chown app:app /app
# The image holds no .git: run.json records this commit instead (docker-shell.sh passes it).
# Declared here, after the heavy layers, so a new commit does not invalidate them.
ARG GIT_COMMIT=""
ENV DERMAID_GIT_COMMIT=${GIT_COMMIT}
# Numeric, so that runtimes enforcing "runAsNonRoot" can verify it without /etc/passwd.
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["/bin/bash", "run-commands.sh"]

# ---------------------------------------------------------------------------------------------
# CPU variant, the default target (last stage).
FROM base AS cpu
ARG APP_UID=1000
COPY . .
RUN chown app:app /app
# The image holds no .git: run.json records this commit instead (docker-shell.sh passes it).
# Declared here, after the heavy layers, so a new commit does not invalidate them.
ARG GIT_COMMIT=""
ENV DERMAID_GIT_COMMIT=${GIT_COMMIT}
# Numeric, so that runtimes enforcing "runAsNonRoot" can verify it without /etc/passwd.
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["/bin/bash", "run-commands.sh"]

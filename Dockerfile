# Training image: the locked Python environment plus this repository; nothing is cloned at run time.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t dermaid-training .                # CPU
#   docker build --build-arg ACCELERATOR=gpu --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t dermaid-training-gpu .
#   docker build --build-arg PIP_INDEX_URL="$PIP_INDEX_URL" -t dermaid-training .   # another package index
#   docker run --rm dermaid-training PROJECT BUCKET - - dataset_v02 1 -- -e 20
#
# One stage on purpose: the legacy builder (no BuildKit) builds every stage up to the target in file
# order, so a separate GPU stage would be built, CUDA wheels and all, for every CPU image. Builds with
# and without BuildKit. Order: system packages, then the locked dependencies, then the code, so a
# code-only change reuses the dependency layers. Nothing of the build host goes in here (no
# certificates, mirrors or index addresses): a host that needs them provides its own base image.
#
# docker-shell.sh builds and runs it with secrets mounted; tools/vertex_submit.py runs it on Vertex AI.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}

# Empty means "pip's own default index"; the Pipfile's source is ${PIP_INDEX_URL}, so it must be set
# while pipenv runs. Build-arg values are kept in the image history (`docker history`): pass an index
# URL only if it holds no credentials.
ARG PIP_INDEX_URL
ARG PIPENV_VERSION=2026.10.3

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
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# The lock alone decides the environment (--deploy fails if Pipfile and lock disagree). Removed in
# the same layer, because nothing needs them at run time: pipenv, pip's and pipenv's caches, and
# TensorFlow's C++ headers (430 MB, only for compiling custom ops).
COPY Pipfile Pipfile.lock ./
RUN PIP_INDEX_URL="${PIP_INDEX_URL:-$(python -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}" \
    && export PIP_INDEX_URL \
    && pip install "pipenv==${PIPENV_VERSION}" \
    && pipenv install --deploy --system \
    && pip uninstall -y pipenv \
    && tf_dir="$(python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("tensorflow").origin))')" \
    && rm -rf "${tf_dir}/include" /root/.cache

# GPU image: CUDA and cuDNN come as pip wheels through TensorFlow's `and-cuda` extra, so the image
# needs no CUDA base, only the host's NVIDIA driver (docker run --gpus all, or a Vertex AI
# accelerator). These wheels are NOT in Pipfile.lock: they are resolved at build time against the
# same tensorflow==2.21.0 pin, without hash checking. Declared after the locked layer, which the CPU
# and GPU images therefore share.
ARG ACCELERATOR=cpu
RUN case "${ACCELERATOR}" in \
        cpu) ;; \
        gpu) PIP_INDEX_URL="${PIP_INDEX_URL:-$(python -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}" \
             pip install "tensorflow[and-cuda]==2.21.0" && rm -rf /root/.cache ;; \
        *) echo "ACCELERATOR must be cpu or gpu, not '${ACCELERATOR}'" >&2; exit 1 ;; \
    esac

# Declared after the dependency layers: an ARG in scope is part of every later RUN's cache key, so
# a user built for another uid (docker-shell.sh passes the host's) still shares them.
ARG APP_UID=1000
RUN groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid app --shell /usr/sbin/nologin app

COPY . .
# The code stays root-owned (read-only for the job); the working directory is the job's, for
# Versioning/, the shard cache, wandb/ and local outputs.
RUN chown app:app /app

# The data registry that `sh dvc_pull.sh` and the six-argument entry point pull from (the original's;
# override with --build-arg DVC_REPO=... or at run time with docker run -e DVC_REPO=...).
ARG DVC_REPO=https://github.com/csci-e-115/dermaid-versioning.git
# The image holds no .git: run.json records this commit instead (docker-shell.sh passes it).
# Declared here, after the heavy layers, so a new commit does not invalidate them.
ARG GIT_COMMIT=""
ENV DVC_REPO=${DVC_REPO} \
    DERMAID_GIT_COMMIT=${GIT_COMMIT}
# Numeric, so that runtimes enforcing "runAsNonRoot" can verify it without /etc/passwd.
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["/bin/bash", "run-commands.sh"]

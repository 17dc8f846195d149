# syntax=docker/dockerfile:1
# memfit image: one image for the API (`memfit serve`), the update worker (`memfit worker`) and the
# operator commands. See docs/deploy.md.
#
#   CPU (default):  docker build -t memfit .
#   CUDA:           docker build -t memfit:cuda --build-arg VARIANT=cuda .
#   another torch:  docker build --build-arg TORCH=torch==2.13.0 \
#                     --build-arg TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128 .
#
# The torch CUDA wheels carry their own CUDA runtime libraries, so the CUDA variant needs no CUDA base
# image: only the NVIDIA driver and container toolkit on the host (`docker run --gpus all`).
# The install commands below are the Makefile's (tests/deploy/test_deploy_files.py keeps them in step).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# cpu | cuda: which torch build TORCH_INDEX defaults to
ARG VARIANT=cpu
# the torch requirement (the Makefile's TORCH)
ARG TORCH=torch==2.13.0
# pip index option for torch (the Makefile's TORCH_INDEX); empty -> chosen from VARIANT
ARG TORCH_INDEX=
# the CUDA wheel index tag used when VARIANT=cuda and TORCH_INDEX is empty
ARG CUDA_TAG=cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is by far the largest and changes least often
RUN set -eu; \
    if [ -z "$TORCH_INDEX" ]; then \
      case "$VARIANT" in \
        cpu) TORCH_INDEX="--index-url=https://download.pytorch.org/whl/cpu" ;; \
        cuda) TORCH_INDEX="--index-url=https://download.pytorch.org/whl/$CUDA_TAG" ;; \
        *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
      esac; \
    fi; \
    pip install -q --upgrade pip; \
    pip install -q $TORCH_INDEX "$TORCH"

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY memlm ./memlm
COPY model_store ./model_store
COPY workers ./workers
COPY service ./service
COPY memfit ./memfit
# a regular (not editable) install: the runtime stage has no source tree. The runtime dependencies
# and the pretrain extra (`memfit pretrain` runs in the image), at the versions of requirements.lock,
# so two builds resolve the same versions; no benchmark extras (peft, rank-bm25, matplotlib), and no
# benchmark code either: .dockerignore leaves memfit/bench out of the context (tests/test_packaging.py).
RUN pip install -q ".[pretrain]" -c requirements.lock

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="memfit" \
      org.opencontainers.image.description="Online knowledge updates for memory-layer LLMs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.memfit.variant="${VARIANT}"

# a fixed non-root uid/gid, so volumes and Kubernetes fsGroup can match it
RUN groupadd --system --gid 10001 memfit \
    && useradd --system --uid 10001 --gid memfit --home-dir /data --shell /usr/sbin/nologin memfit \
    && mkdir -p /data && chown memfit:memfit /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MEMFIT_HOME=/data \
    MEMFIT_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

USER memfit:memfit
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers without a key unless MEMFIT_PUBLIC_HEALTH=false (then use an orchestrator probe
# that sends a key, or disable this check). python, not curl: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MEMFIT_PORT', '8000'), timeout=4)"]

# The server refuses a non-local bind without API keys: set MEMFIT_API_KEYS_FILE (or
# MEMFIT_API_KEYS), or add --insecure for a throwaway local try-out.
ENTRYPOINT ["memfit"]
CMD ["serve", "--host", "0.0.0.0"]

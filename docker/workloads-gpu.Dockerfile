# syntax=docker/dockerfile:1.7
# The GPU workloads image: generator (vLLM 0.32.0) and learner (torch 2.13.0 + DeepSpeed 0.19.8,
# NCCL). The image the CRD's default spec.image names.
#
#   docker build -f docker/workloads-gpu.Dockerfile -t ghcr.io/asyncrlhf/workloads:0.1.0 .
#
# torch 2.13.0 wheels carry their own CUDA 13.0 user-space libraries (cuBLAS, cuDNN, NCCL), so the
# base only needs the CUDA 13.0 runtime layout and a driver >= 580 on the node. vLLM resolves
# its CUDA stack around docker/requirements-workloads-gpu.txt, which pins vLLM, DeepSpeed and the
# project's own dependencies to the versions the tests ran (the CPU lock's).
# DeepSpeed's fused CUDA ops are not prebuilt (that needs nvcc and a devel image): the learner
# uses torch's AdamW through DeepSpeed ("torch_adam": true), which is all ZeRO 1-3 need.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/asyncrlhf \
 && /opt/asyncrlhf/bin/pip install --no-deps "setuptools==78.1.1"
COPY docker/requirements-workloads-gpu.txt /tmp/requirements.txt
RUN /opt/asyncrlhf/bin/pip install --prefer-binary -r /tmp/requirements.txt \
 && /opt/asyncrlhf/bin/pip check
COPY pyproject.toml README.md /src/
COPY workloads /src/workloads
COPY operator /src/operator
RUN /opt/asyncrlhf/bin/pip install --no-deps --no-build-isolation /src

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="asyncrlhf-workloads" \
      org.opencontainers.image.description="asyncrlhf generator and learner for NVIDIA GPUs (vLLM, torch, DeepSpeed)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Triton (used by vLLM's kernels) compiles a small launcher with gcc against Python's headers at
# first use; libnuma1 for NCCL/vLLM CPU-affinity helpers. The base image's ubuntu user owns uid 1000.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-dev gcc libc6-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --user-group --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin asyncrlhf)
COPY --from=build /opt/asyncrlhf /opt/asyncrlhf
ENV PATH=/opt/asyncrlhf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
ENTRYPOINT ["asyncrlhf"]
CMD ["--help"]

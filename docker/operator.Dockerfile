# syntax=docker/dockerfile:1.7
# The operator image: `asyncrlhf operator` (kopf) with only what it imports; no torch, no CUDA.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/asyncrlhf/operator:0.1.0 .
#
# Build from the repository root. Python packages come from docker/requirements-operator.txt, a
# lock of the environment the tests ran in (`python docker/lock.py`), installed with --no-deps so
# the build resolves nothing. The chart runs it as user 1000 on a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/asyncrlhf \
 && /opt/asyncrlhf/bin/pip install --no-deps "setuptools==78.1.1"
COPY docker/requirements-operator.txt /tmp/requirements.txt
RUN /opt/asyncrlhf/bin/pip install --no-deps --prefer-binary -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY workloads /src/workloads
COPY operator /src/operator
RUN /opt/asyncrlhf/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/asyncrlhf/bin/pip uninstall --yes setuptools pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="asyncrlhf-operator" \
      org.opencontainers.image.description="Kubernetes operator for asynchronous RLHF jobs (AsyncRLHFJob)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 asyncrlhf \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin asyncrlhf
COPY --from=build /opt/asyncrlhf /opt/asyncrlhf
ENV PATH=/opt/asyncrlhf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 1000:1000
# 8080: liveness (/healthz); 9090: Prometheus (/metrics).
EXPOSE 8080 9090
ENTRYPOINT ["asyncrlhf"]
CMD ["operator", "--all-namespaces"]

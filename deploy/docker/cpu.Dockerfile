# syntax=docker/dockerfile:1
# The component image (components.COMPONENT_IMAGE): every pipeline step on CPU, the `parti`
# command, and the tritonserver bundled in nvidia-pytriton for the smoke-test step.
# Build context is the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t ghcr.io/parti-ops/parti-ops:0.1.0 .

# Builder and runtime share one base, so the venv's interpreter links resolve in both.
FROM python:3.11.14-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: with the project's pin alone pip takes PyPI's CUDA
# build and several GB of NVIDIA libraries (the Makefile's TORCH_INDEX does the same).
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt .ci/constraints.txt
COPY model model
COPY components components
COPY pipelines pipelines
COPY deploy deploy
RUN pip install --no-cache-dir -c .ci/constraints.txt . && pip check

# The smoke test's server, laid out as `make install` does (Makefile, target .serving):
# tritonserver unpacked beside the venv, and the numpy-1 environment its Python backend
# stub needs (deploy/server.py finds both through sys.prefix).
RUN python -m venv /opt/venv/serve-env \
    && /opt/venv/serve-env/bin/pip install --no-cache-dir -r deploy/serve-requirements.txt \
    && pip download --no-cache-dir --no-deps -d /tmp/wheels nvidia-pytriton==0.7.0 \
    && python -m zipfile -e /tmp/wheels/nvidia_pytriton-0.7.0-*.whl /opt/venv/tritonserver \
    && chmod +x /opt/venv/tritonserver/pytriton/tritonserver/bin/* \
        /opt/venv/tritonserver/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub \
    && rm -rf /tmp/wheels


FROM python:3.11.14-slim-trixie

LABEL org.opencontainers.image.title="parti-ops" \
      org.opencontainers.image.description="Pipeline steps and the parti command (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /work --shell /usr/sbin/nologin parti \
    && install -d -o 10001 -g 10001 /work

COPY --from=builder /opt/venv /opt/venv

# HOME is where MLflow, Hugging Face and matplotlib put their caches; /work is writable
# (an emptyDir under a read-only root filesystem).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/work \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /work
USER 10001:10001
ENTRYPOINT ["parti"]
CMD ["--help"]

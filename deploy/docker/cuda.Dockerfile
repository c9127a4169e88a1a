# syntax=docker/dockerfile:1
# The GPU image for training (the PyTorchJob in deploy/k8s/training, torchrun over NCCL)
# and ONNX export. Build context is the repository root:
#   docker build -f deploy/docker/cuda.Dockerfile -t ghcr.io/parti-ops/parti-ops-cuda:0.1.0 .
#
# Why this base: PyPI's torch==2.13.0 for Linux is built for CUDA 13.0 and brings the CUDA
# libraries as wheels (cuda-toolkit 13.0.3, cuDNN 9.20, NCCL 2.29), and onnxruntime-gpu
# 1.31.1 targets CUDA 13 as well. So the image needs no CUDA toolkit, only what the NVIDIA
# container runtime reads: the `base` flavour of CUDA 13.0 carries NVIDIA_REQUIRE_CUDA (a
# node whose driver is too old is refused at start, with a message, not deep in NCCL) and
# the forward-compatibility package. NGC's PyTorch image was not taken: it ships its own
# torch build, which the project's pin would replace, on Python 3.12; Python 3.11 here is
# the same CPython release as the CPU image, from uv's standalone builds.

FROM ghcr.io/astral-sh/uv:0.9.26 AS uv

FROM nvidia/cuda:13.0.1-base-ubuntu24.04 AS builder

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN uv python install 3.11.14 && uv venv --seed --python 3.11.14 /opt/venv

# torch first and pinned: PyPI's Linux wheel is the CUDA 13.0 build.
RUN pip install --no-cache-dir torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt .ci/constraints.txt
COPY model model
COPY components components
COPY pipelines pipelines
COPY deploy deploy
# onnxruntime-gpu replaces onnxruntime (both install the `onnxruntime` package, so the CPU
# one goes first); 1.31.1 is the newest GPU build on PyPI. `pip check` runs before the swap,
# since afterwards it reports the project's `onnxruntime` requirement as missing.
RUN pip install --no-cache-dir -c .ci/constraints.txt . \
    && pip check \
    && pip uninstall --yes onnxruntime \
    && pip install --no-cache-dir onnxruntime-gpu==1.31.1


FROM nvidia/cuda:13.0.1-base-ubuntu24.04

LABEL org.opencontainers.image.title="parti-ops-cuda" \
      org.opencontainers.image.description="Training (torchrun, NCCL) and ONNX export on NVIDIA GPUs" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /work --shell /usr/sbin/nologin parti \
    && install -d -o 10001 -g 10001 /work

# Same paths as in the builder: the venv's interpreter is a link into /opt/python.
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/work \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /work
USER 10001:10001
ENTRYPOINT ["parti"]
CMD ["--help"]

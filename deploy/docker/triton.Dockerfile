# syntax=docker/dockerfile:1
# The serving image: NGC's Triton Inference Server with what the `parti` Python-backend
# model imports. The model repository carries its own code (model.py and parti_runtime.py
# in each version folder, deploy/triton.py), so neither torch nor the parti-ops package is
# needed here (STYLE.md: no torch in the serving image). Build context is the repository
# root, of which nothing is sent (triton.Dockerfile.dockerignore):
#   docker build -f deploy/docker/triton.Dockerfile -t ghcr.io/parti-ops/triton:0.1.0 .
#
# Release 26.08 (CUDA 13.4.1): the newest with published release notes when chosen, and
# later than the fixes of NVIDIA's August 2025 bulletin (CVE-2025-23310/23311, HTTP stack
# overflow; CVE-2025-23319/23320/23334, Python-backend shared-memory chain to RCE, fixed in
# 25.07) and of security bulletin 5828 (May 2026: CVE-2026-24206/24207, authentication
# bypass, one through the SageMaker port ignoring --http-restricted-api; CVE-2026-24208/
# 24209, path traversal). Its CUDA 13 matches onnxruntime-gpu 1.31.1's.
FROM nvcr.io/nvidia/tritonserver:26.08-py3

LABEL org.opencontainers.image.title="parti-ops-triton" \
      org.opencontainers.image.description="Triton serving the parti model (Python backend + ONNX Runtime)" \
      org.opencontainers.image.licenses="Apache-2.0"

# The pins of deploy/serve-requirements.txt (tests/deploy/test_dockerfiles.py keeps them
# equal), with ONNX Runtime's GPU build. The image's Python is Ubuntu's, marked externally
# managed (PEP 668); this image is that environment's only user.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
        numpy==1.26.4 \
        onnxruntime-gpu==1.31.1 \
        tokenizers==0.23.3

# UID 1000 is the image's own `triton-server` user (Triton's build.py asserts that ID).
USER 1000:1000
WORKDIR /opt/tritonserver

# Serving only, by default: no model control (no load/unload over the network), and the
# repository-index and shared-memory APIs behind a header whose value is random per start
# unless TRITON_ADMIN_KEY is given. The Kubernetes manifests pass their own arguments.
CMD ["/bin/sh", "-c", "key=\"${TRITON_ADMIN_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')}\" && exec tritonserver --model-repository=/models --model-control-mode=none --strict-readiness=true --allow-metrics=true --http-restricted-api=model-repository,shared-memory:triton-admin-key=\"$key\" --grpc-restricted-protocol=model-repository,shared-memory:triton-admin-key=\"$key\""]

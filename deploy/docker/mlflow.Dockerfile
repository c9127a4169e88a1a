# syntax=docker/dockerfile:1
# The MLflow tracking server (deploy/k8s/base/mlflow.yaml): the project's MLflow with the
# PostgreSQL driver and boto3 for the S3 artifact store, which MLflow's own image lacks.
# Build context is the repository root (only the constraints file is sent):
#   docker build -f deploy/docker/mlflow.Dockerfile -t ghcr.io/parti-ops/mlflow:0.1.0 .

FROM python:3.11.14-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY .ci/constraints.txt /tmp/constraints.txt
# The constraints keep MLflow's own dependencies at the versions the project tests with.
RUN pip install --no-cache-dir -c /tmp/constraints.txt \
        mlflow==3.17.2 \
        psycopg2-binary==2.9.13 \
        boto3==1.44.5 \
    && pip check


FROM python:3.11.14-slim-trixie

LABEL org.opencontainers.image.title="parti-ops-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL and S3 support" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /tmp
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]

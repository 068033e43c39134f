# The tracking server of docker/compose.yaml: MLflow with the PostgreSQL driver and the S3 client for MinIO.
ARG MLFLOW_VERSION=v3.1.1
FROM ghcr.io/mlflow/mlflow:${MLFLOW_VERSION}
RUN pip install --no-cache-dir "psycopg2-binary==2.9.10" "boto3==1.38.27"
USER 1000:1000

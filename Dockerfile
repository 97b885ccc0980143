# memdb: one image for the server (`memdb-server`) and the inference worker (`memdb-worker`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY memdb memdb
COPY server server
COPY client client
COPY worker worker
ARG EXTRAS=server
# the cluster image adds Debian's etcd and Redis (APT_PACKAGES="etcd-server redis-server redis-tools")
ARG APT_PACKAGES=""
RUN if [ -n "$APT_PACKAGES" ]; then apt-get update && \
      apt-get install -y --no-install-recommends $APT_PACKAGES && rm -rf /var/lib/apt/lists/*; fi
RUN pip install --no-cache-dir ".[${EXTRAS}]"
EXPOSE 50051 9464
CMD ["memdb-server", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464", "--data-dir", "/data"]

# The reward server. CPU by default; for CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (the compose file's gpu profile does). Every dependency but torch is pinned, with its hashes, by
# requirements/lock.txt; torch comes from TORCH_INDEX (the machine's build: CPU or a CUDA version).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_CACHE=1 \
    HF_HOME=/hf-cache
# OpenCV (pulled in by rapidocr) needs these shared libraries at import time; curl: the healthcheck.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# uv, pinned with its hashes (as `make` bootstraps it), then torch from the machine's index.
COPY requirements/bootstrap.txt requirements/lock.txt ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/bootstrap.txt \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY protos ./protos
COPY common ./common
COPY client ./client
COPY reward_server ./reward_server
# the DINO model scores through kernels/ (Triton on CUDA, its PyTorch reference elsewhere)
COPY kernels ./kernels
# The lock constrains (and hash-checks) the units' dependencies and their build requirements:
# protos/setup.py generates the gRPC modules during the build with the lock's grpcio-tools.
RUN uv pip install --system -c requirements/lock.txt --build-constraint requirements/lock.txt \
        ./protos "./common[config,torch]" ./client ./kernels ./reward_server \
    && useradd --create-home --uid 1000 reward && mkdir -p /state /hf-cache && chown reward /state /hf-cache

USER reward
VOLUME ["/state"]
EXPOSE 50051 8080
# /readyz: models loaded and warmed up, not draining (503 otherwise). Plain HTTP: a server run
# with --tls-cert needs this overridden (e.g. curl -fsS --cacert CA https://localhost:8080/readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
# Listening on every interface needs tokens (ADVGRPO_AUTH_TOKEN, ADVGRPO_TOKENS or --tokens-file):
# without, the server refuses to start unless --insecure is added to the command (docker-compose.yml
# does, for a stack published on the host's loopback only).
ENTRYPOINT ["advgrpo-reward-server", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8080", "--state-dir", "/state"]
CMD ["--preset", "toy"]

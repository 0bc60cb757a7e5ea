# The reward server. CPU by default; for CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 --build-arg TORCH_SPEC=torch
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# OpenCV (pulled in by rapidocr) needs these shared libraries at import time.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY constraints.txt ./
COPY protos ./protos
COPY common ./common
COPY client ./client
COPY reward_server ./reward_server
# the DINO model scores through kernels/ (Triton on CUDA, its PyTorch reference elsewhere)
COPY kernels ./kernels
# protos/setup.py generates the gRPC modules during the build
RUN pip install ./protos ./common[config,torch] ./client ./kernels ./reward_server \
    && useradd --create-home --uid 1000 reward && mkdir -p /state && chown reward /state

USER reward
VOLUME ["/state"]
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["advgrpo-reward-server", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8080", "--state-dir", "/state"]
CMD ["--preset", "tiny"]

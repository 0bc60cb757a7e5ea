# The trainer: advgrpo-train, advgrpo-generate, the toy-world demo (python -m advgrpo.trainer.demo) and
# the accelerate launch configs (/app/trainer/accelerate-configs/). It talks to a reward server over gRPC
# and installs no server code. CPU by default; for CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Every dependency but torch is pinned, with its hashes, by requirements/lock.txt.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

# The trainer writes ADVGRPO_HEARTBEAT_FILE every few seconds; the HEALTHCHECK reads it.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_CACHE=1 \
    HF_HOME=/hf-cache ADVGRPO_HEARTBEAT_FILE=/tmp/advgrpo/heartbeat.json

WORKDIR /app
# uv, pinned with its hashes (as `make` bootstraps it), then torch from the machine's index.
COPY requirements/bootstrap.txt requirements/lock.txt ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/bootstrap.txt \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY protos ./protos
COPY common ./common
COPY client ./client
COPY trainer ./trainer
RUN uv pip install --system -c requirements/lock.txt --build-constraint requirements/lock.txt \
        ./protos "./common[config,torch]" ./client ./trainer \
    && useradd --create-home --uid 1000 trainer && mkdir -p /outputs /hf-cache && chown trainer /outputs /hf-cache

USER trainer
VOLUME ["/outputs"]
# Unhealthy when the trainer is gone or stopped, its heartbeat is stale (frozen), or its loop has
# made no progress for $ADVGRPO_HEALTH_MAX_STALL_S (default 30 min; $ADVGRPO_HEALTH_MAX_START_S,
# default 1 h, while it loads the model). See advgrpo/trainer/healthcheck.py.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "advgrpo.trainer.healthcheck"]
ENTRYPOINT ["advgrpo-train"]
CMD ["--help"]

"""``advgrpo-reward-server --backend ray``: starts (or joins) Ray, deploys the application, prints
the ready line, and on SIGTERM/SIGINT drains the ingress and deletes the application."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve

from advgrpo.reward_server.config import ServerConfig
from advgrpo.reward_server.ray_serve.app import build_application, check_durable

log = logging.getLogger("advgrpo.reward_server.ray")


def _logical_cpus(config: ServerConfig) -> int:
    """CPUs a local Ray is told it has: the machine's, or what the deployments ask for if more
    (Ray's CPUs are scheduling units; two replicas asking for one each still run on one core)."""
    r = config.ray
    asked = r.owner_num_cpus + r.ingress_num_cpus
    for dep in config.scoring_deployments().values():
        replicas = dep.num_replicas or r.replicas
        if dep.autoscaling is not None:
            replicas = int(dep.autoscaling.get("max_replicas", replicas))
        asked += dep.num_cpus * replicas
    return max(os.cpu_count() or 1, math.ceil(asked))


def run(config: ServerConfig, ready_file: Path | None = None) -> None:
    check_durable(config)  # before Ray starts
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    started_here = address is None
    if started_here:
        # A Ray of our own reports no usage statistics (they would go to the internet).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=_logical_cpus(config),
            include_dashboard=False,
            logging_level=logging.WARNING,
            namespace="advgrpo",
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING, namespace="advgrpo")
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(*_) -> None:
        if not serving.is_set():  # still deploying (serve.run can wait for resources for good)
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    app_name = config.ray.app_name
    try:
        serve.start(proxy_location="Disabled")
        # Serve's access log would log every call, long polls included; our front end has metrics.
        handle = serve.run(
            build_application(config), name=app_name, route_prefix=None, logging_config={"enable_access_log": False}
        )
        info = {**handle.ready_info.remote().result(), "backend": "ray", "app": app_name}
        serving.set()
        line = json.dumps(info)
        print(line, flush=True)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(line + "\n")
            tmp.replace(ready_file)
        log.info("serving gRPC on %s through Ray Serve application %r", info["grpc"], app_name)
        stop.wait()
        log.info("draining")
        try:
            handle.drain.remote().result(timeout_s=config.server.drain_notice_s + config.server.drain_grace_s + 10)
        except Exception as exc:  # the ingress may be gone already; delete the app all the same
            log.warning("drain failed: %s", exc)
        serve.delete(app_name)
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
        log.info("stopped")

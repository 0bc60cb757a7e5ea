"""Process lifecycle: load models, start gRPC and HTTP on one event loop, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import torch
import uvicorn

from advgrpo.common.allocator import keep_freed_memory
from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.config import ServerConfig, address
from advgrpo.reward_server.host import ModelHost
from advgrpo.reward_server.models.base import resolve_device
from advgrpo.reward_server.rpc.server import GrpcFrontend

log = logging.getLogger("advgrpo.reward_server")


def check_device(device: str) -> str:
    """The device models load on; a CUDA device on a machine without one is a config error."""
    resolved = str(resolve_device(device))
    if resolved.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"server.device: {device!r} requested but CUDA is not available")
    return resolved


class RewardServer:
    """One server process: a ModelHost behind a gRPC frontend and an optional HTTP side.

    ``host``: what answers the front end's calls instead of a ModelHost loaded here (the Ray
    backend's ingress passes its ``RayHost``, which calls the model deployments)."""

    def __init__(self, config: ServerConfig, host=None):
        self.config = config
        self.host = host
        self.grpc: GrpcFrontend | None = None
        self.http_port: int | None = None
        self._uvicorn = None
        self._http_task: asyncio.Task | None = None
        self._http_state = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        settings = self.config.server
        if self.host is None:
            if settings.keep_freed_memory:
                keep_freed_memory()
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            device = check_device(settings.device)
            t0 = time.perf_counter()
            # Loading blocks for seconds to minutes: keep it off the loop.
            self.host = await asyncio.to_thread(ModelHost.from_config, self.config, device)
            log.info("models ready in %.1fs on %s", time.perf_counter() - t0, device)
        self.grpc = GrpcFrontend(self.host)
        await self.grpc.start()
        if settings.http_port is not None:
            await self._start_http()

    async def _start_http(self) -> None:
        from advgrpo.reward_server.web.app import HttpState, build_app

        settings = self.config.server
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.http_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"--http-port {settings.http_port}: cannot listen on {settings.host} ({exc.strerror})"
            ) from None
        self.http_port = sock.getsockname()[1]
        self._http_state = HttpState()
        app = build_app(self.host, self._http_state)
        tls = {}
        if settings.tls_cert is not None:  # the same certificate, and client CA, as gRPC
            tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **tls)
        self._uvicorn = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self._http_state.ready = True

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        grace = self.config.server.drain_grace_s
        if self.host is not None:
            self.host.metrics.ready.set(0)  # advgrpo_ready follows health: not ready while draining
        if self._http_state is not None:
            self._http_state.draining = True
        if self.grpc is not None:
            await self.grpc.drain(self.config.server.drain_notice_s, grace)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=grace + 5)
        if self.host is not None:
            await self.host.close()

    def ready_info(self) -> dict:
        s = self.config.server
        info = {"event": "ready", "grpc": address(s.host, self.grpc.port), "grpc_port": self.grpc.port}
        if self.http_port is not None:
            scheme = "https" if s.tls_cert is not None else "http"
            info.update(http=f"{scheme}://{address(s.host, self.http_port)}", http_port=self.http_port)
        info["tls"] = s.tls_cert is not None
        info["models"] = [{**m.__dict__, "queue_depth": self.host.queue_depth(m.name)} for m in self.host.list_models()]
        return info


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to us (it otherwise takes over SIGINT/SIGTERM)."""

    def capture_signals(self):
        return contextlib.nullcontext()


async def run(config: ServerConfig, ready_file: Path | None = None) -> None:
    server = RewardServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
        info = server.ready_info()
        line = json.dumps(info)
        print(line, flush=True)  # the ready line: tests and scripts read the ports from it
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(line + "\n")
            tmp.replace(ready_file)
        log.info("serving gRPC on %s%s", info["grpc"], f", HTTP on {info['http']}" if "http" in info else "")
        await server.wait_stopped()
        log.info("draining (grace %.1fs)", config.server.drain_grace_s)
    finally:
        await server.stop()
        log.info("stopped")
        sys.stdout.flush()

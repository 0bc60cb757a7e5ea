"""Shared fixtures: a real reward-server process on loopback, images, and channels."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest

from advgrpo.common.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def start_server():
    """Factory: start_server(args...) -> ServerProcess; every started server is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(list(args), env=env)  # HTTP on a free port unless args say --no-http
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def image_env(tmp_path_factory):
    """image_env("reward-server" | "trainer") -> ImageEnv: a bare environment holding the wheels that
    image's Dockerfile builds from its build context (built once per session)."""
    from .docker_helpers import build_image_env

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_image_env(name, tmp_path_factory.mktemp(f"image-{name}"))
        return built[name]

    return get


@pytest.fixture
def in_process_server():
    """Factory for fake servers in this process: in_process_server(register, on_stop=None) ->
    target. ``register(server)`` adds the handlers; every server stops after the test (after
    ``on_stop()``, which e.g. releases handlers that hang)."""
    started: list[tuple[grpc.Server, Callable[[], None] | None]] = []

    def start(register: Callable[[grpc.Server], None], on_stop: Callable[[], None] | None = None) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, on_stop))
        return f"127.0.0.1:{port}"

    yield start
    for server, on_stop in started:
        if on_stop is not None:
            on_stop()
        server.stop(0)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """One tiny-preset server per test module (with a state dir)."""
    state = tmp_path_factory.mktemp("state")
    server = ServerProcess(["--preset", "tiny", "--state-dir", str(state)])
    yield server
    server.stop()


# ---------------------------------------------------------------- images


def smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth colour gradient ("reference-like")."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    c0, c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0 * (1 - x[..., None]) + c1 * x[..., None] * (1 - y[..., None]) + c2 * y[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def noise_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Uniform noise ("generation-like")."""
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

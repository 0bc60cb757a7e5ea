"""Shared fixtures: a real reward-server process on loopback, images, and channels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """``python -m reward_server`` in a child process; ports come from its ready line."""

    def __init__(self, args: list[str], env: dict | None = None, timeout_s: float = 120.0):
        cmd = [sys.executable, "-m", "reward_server", "--port", "0", "--http-port", "0", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.stderr_tail: deque[str] = deque(maxlen=200)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.info = self._wait_ready(timeout_s)
        self.target = self.info["grpc"]
        self.http = self.info.get("http")

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail.append(line)

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        result: dict = {}

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("{"):
                    result.update(json.loads(line))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not result:
            self.kill()
            raise RuntimeError("server did not become ready:\n" + "".join(self.stderr_tail))
        return result

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def log(self) -> str:
        return "".join(self.stderr_tail)


@pytest.fixture
def start_server():
    """Factory: start_server(args...) -> ServerProcess; every started server is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(list(args), env=env)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


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

"""Run a reward server as a child process: ``python -m advgrpo.reward_server --port 0 ...``, ports read
from its ready line. Used by the demos, the tests and the benchmarks, and handy for scripts that
want a private server (``with ServerProcess(["--preset", "tiny"]) as server: server.target``)."""

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
from typing import Sequence


class ServerProcess:
    """The child is the server itself (no shell in between), so ``pid`` is the process to measure."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        http: bool = True,
        env: dict[str, str] | None = None,
        log_level: str | None = None,
        log_file: Path | None = None,
        timeout_s: float = 120.0,
        command: Sequence[str] | None = None,
    ):
        """``command``: what starts the server (default: this interpreter's ``-m advgrpo.reward_server``;
        e.g. another environment's ``advgrpo-reward-server``); ports and ``args`` are appended."""
        cmd = [*(command or [sys.executable, "-m", "advgrpo.reward_server"]), "--port", "0"]
        cmd += ["--http-port", "0"] if http else ["--no-http"]
        if log_level:
            cmd += ["--log-level", log_level]
        cmd += list(args)
        self._log = open(log_file, "w") if log_file else None
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log or subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.pid = self.proc.pid
        self.stderr_tail: deque[str] = deque(maxlen=200)
        if self._log is None:
            threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        self.info = self._wait_ready(timeout_s)
        self.target: str = self.info["grpc"]
        self.http: str | None = self.info.get("http")

    def _drain(self, stream) -> None:
        for line in stream:
            self.stderr_tail.append(line)

    @property
    def log(self) -> str:
        return "".join(self.stderr_tail)

    def _wait_ready(self, timeout_s: float) -> dict:
        result: dict = {}

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("{"):
                    result.update(json.loads(line))
                    break
            for _ in self.proc.stdout:  # keep draining: the child never blocks on a full pipe
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not result and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if not result:
            self.kill()
            raise RuntimeError("reward server did not become ready:\n" + self.log)
        return result

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains), then the exit code; killed if it outlives ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""The trainer's heartbeat, and the health check that reads it (the trainer image's HEALTHCHECK).

A trainer started with ``$ADVGRPO_HEARTBEAT_FILE`` set (the trainer image sets it) keeps that file
up to date from a background thread, every few seconds: its pid, the time, its phase, the epoch,
and when the training loop last made progress (a batch sampled or trained, an epoch, an eval or a
checkpoint done). ``python -m advgrpo.trainer.healthcheck`` reads it back and exits 1, saying why,
when there is no heartbeat, the trainer stopped (``finished``/``failed``), its process is gone, the
heartbeat is older than ``--max-age`` (the process is frozen or killed), or the loop has made no
progress for ``--max-stall`` seconds (``--max-start`` while it is still starting: loading or
downloading the model, connecting to the reward server). Standard library only: the check must
start fast and never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

ENV_FILE = "ADVGRPO_HEARTBEAT_FILE"
ENV_MAX_AGE = "ADVGRPO_HEALTH_MAX_AGE_S"
ENV_MAX_STALL = "ADVGRPO_HEALTH_MAX_STALL_S"
ENV_MAX_START = "ADVGRPO_HEALTH_MAX_START_S"
DEFAULT_MAX_AGE_S = 30.0
DEFAULT_MAX_STALL_S = 1800.0
DEFAULT_MAX_START_S = 3600.0
INTERVAL_S = 5.0
STARTING = "starting"
log = logging.getLogger(__name__)


class Heartbeat:
    """Writes ``path`` (JSON, replaced atomically) every ``interval_s`` until ``stop``."""

    def __init__(self, path: str | Path, interval_s: float = INTERVAL_S):
        self.path = Path(path)
        self.interval_s = interval_s
        now = time.time()
        self._state = {
            "pid": os.getpid(),
            "status": "running",
            "phase": STARTING,
            "started": now,
            "progress_time": now,
        }
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def progress(self, phase: str, **fields) -> None:
        """The loop moved on: ``phase`` (e.g. sampling, training) and what it is at (epoch, batch)."""
        with self._lock:
            self._state.update(fields, phase=phase, progress_time=time.time())

    def stop(self, status: str = "finished", error: str | None = None) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        with self._lock:
            self._state["status"] = status
            if error:
                self._state["error"] = error
        self._write()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._write()
            except OSError:
                pass  # a full or read-only disk: the check sees a stale heartbeat and says so

    def _write(self) -> None:
        with self._lock:
            record = {**self._state, "time": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)


_current: Heartbeat | None = None


def start_from_env() -> Heartbeat | None:
    """Starts the heartbeat when ``$ADVGRPO_HEARTBEAT_FILE`` is set, in one process only: the main
    one of a multi-process launch (rank 0), whose loop waits on every other rank anyway."""
    global _current
    path = os.environ.get(ENV_FILE)
    if not path or int(os.environ.get("RANK", "0")) != 0:
        return None
    if _current is None:
        try:
            _current = Heartbeat(path).start()
        except OSError as exc:  # the run matters more than its health report
            log.warning("no heartbeat (the health check will say so): cannot write %s: %s", path, exc)
    return _current


def progress(phase: str, **fields) -> None:
    if _current is not None:
        _current.progress(phase, **fields)


def stop(status: str = "finished", error: str | None = None) -> None:
    global _current
    if _current is not None:
        try:
            _current.stop(status, error)
        except OSError as exc:
            log.warning("could not record the trainer's end (%s) in %s: %s", status, _current.path, exc)
        finally:
            _current = None


class RunOutcome:
    """What ``reporting`` records when its block ends: ``finished`` unless the block says otherwise."""

    def __init__(self) -> None:
        self.status, self.error = "finished", None

    def fail(self, error: str | None = None) -> None:
        self.status, self.error = "failed", error


@contextlib.contextmanager
def reporting(enabled: bool = True):
    """The heartbeat for a whole run (when ``$ADVGRPO_HEARTBEAT_FILE`` is set): it starts here and
    stops with ``finished`` when the block ends, ``interrupted`` on Ctrl-C, ``failed`` with the
    error on an exception, or whatever the block set on the yielded ``RunOutcome``."""
    if enabled:
        start_from_env()
    outcome = RunOutcome()
    try:
        yield outcome
    except KeyboardInterrupt:
        outcome.status = "interrupted"
        raise
    except BaseException as exc:
        outcome.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop(outcome.status, outcome.error)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet still answers kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check(
    path: str | Path,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_stall_s: float = DEFAULT_MAX_STALL_S,
    max_start_s: float = DEFAULT_MAX_START_S,
    now: float | None = None,
) -> tuple[bool, str]:
    """(healthy, what the heartbeat says)."""
    now = time.time() if now is None else now
    try:
        beat = json.loads(Path(path).read_text())
        pid, status, phase = int(beat["pid"]), beat["status"], beat["phase"]
        written, progressed = float(beat["time"]), float(beat["progress_time"])
    except FileNotFoundError:
        return False, f"no heartbeat at {path} (trainer not started, or ${ENV_FILE} not set for it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable heartbeat {path}: {exc}"
    where = f"pid {pid}, {phase}" + (f", epoch {beat['epoch']}" if "epoch" in beat else "")
    if status != "running":
        return False, f"trainer {status} ({where})" + (f": {beat['error']}" if beat.get("error") else "")
    if not _process_alive(pid):
        return False, f"trainer process {pid} is gone ({where})"
    if now - written > max_age_s:
        return False, f"heartbeat {now - written:.0f}s old, more than {max_age_s:.0f}s ({where})"
    limit = max_start_s if phase == STARTING else max_stall_s
    if now - progressed > limit:
        return False, f"no progress for {now - progressed:.0f}s, more than {limit:.0f}s ({where})"
    return True, f"trainer running ({where}, last progress {now - progressed:.0f}s ago)"


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m advgrpo.trainer.healthcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--file", default=env.get(ENV_FILE), help=f"the heartbeat file (default ${ENV_FILE})")
    p.add_argument("--max-age", type=float, default=float(env.get(ENV_MAX_AGE, DEFAULT_MAX_AGE_S)))
    p.add_argument("--max-stall", type=float, default=float(env.get(ENV_MAX_STALL, DEFAULT_MAX_STALL_S)))
    p.add_argument("--max-start", type=float, default=float(env.get(ENV_MAX_START, DEFAULT_MAX_START_S)))
    args = p.parse_args(argv)
    if not args.file:
        print(f"unhealthy: no --file and ${ENV_FILE} is not set")
        return 1
    healthy, message = check(args.file, max_age_s=args.max_age, max_stall_s=args.max_stall, max_start_s=args.max_start)
    print(("healthy: " if healthy else "unhealthy: ") + message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

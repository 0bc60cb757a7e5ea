"""Durable discriminator state: one safetensors file per model, replaced atomically.

An update is acknowledged only after its state is on disk (write to a temp file, fsync, rename,
fsync the directory), so a SIGKILL at any moment leaves either the old or the new state, never a
torn file. Optimizer state is flattened to tensors + JSON metadata: no pickle anywhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.config import MODEL_NAME

VERSION_KEY = "version"
FINGERPRINT_KEY = "fingerprint"


class StateStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--state-dir {self.dir}: cannot create ({exc.strerror})") from None
        if not os.access(self.dir, os.W_OK):
            raise ConfigError(f"--state-dir {self.dir}: not writable")

    def path(self, model: str) -> Path:
        if not MODEL_NAME.match(model):  # config refuses such names; a guard for direct use
            raise ValueError(f"model name {model!r} is not usable as a file name")
        return self.dir / f"{model}.safetensors"

    def save(self, model: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        target = self.path(model)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{model}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, model: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The saved state of ``model``, or None when it has none yet."""
        target = self.path(model)
        if not target.exists():
            return None
        try:
            tensors = load_file(target)

            with safe_open(target, framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{target}: unreadable state file ({exc})") from None
        return tensors, metadata

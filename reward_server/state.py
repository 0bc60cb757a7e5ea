"""Durable discriminator state: one safetensors file per model, replaced atomically.

An update is acknowledged only after its state is on disk (write to a temp file, fsync, rename,
fsync the directory), so a SIGKILL at any moment leaves either the old or the new state, never a
torn file. Optimizer state is flattened to tensors + JSON metadata: no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import MODEL_NAME
from .errors import ConfigError

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

def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer, prefix: str = "optim."
) -> tuple[dict[str, torch.Tensor], str]:
    """Flattens an optimizer's state: per-parameter tensors, and the param groups as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, groups

def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str, prefix: str = "optim."
) -> None:
    meta = json.loads(groups_json)
    state: dict[int, dict[str, object]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, _, name = key[len(prefix):].partition(".")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:  # JSON turns tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})

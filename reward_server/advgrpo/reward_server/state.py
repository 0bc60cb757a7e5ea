"""Durable discriminator state: one safetensors file per model, replaced atomically, checksummed.

An update is acknowledged only after its state is on disk (write to a temp file, fsync, rename,
fsync the directory), so a SIGKILL at any moment leaves either the old or the new state, never a
torn file. Optimizer state is flattened to tensors + JSON metadata: no pickle anywhere.

Every file carries a SHA-256 of its tensors (names, dtypes, shapes, bytes) and of its other
metadata (``CHECKSUM_KEY``). A file that does not parse, or whose contents do not match its
checksum (a bad disk, a truncated copy, an edit), is never loaded (a file written before checksums
existed is loaded with a warning, and rewritten with one at the next update): the server refuses to start
and names it. The state it replaced stays beside it as ``<model>.prev.safetensors`` (a hard
link made before each replacement), so an operator can go back one update knowingly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file

from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.config import MODEL_NAME

VERSION_KEY = "version"
FINGERPRINT_KEY = "fingerprint"
CHECKSUM_KEY = "sha256"

log = logging.getLogger(__name__)


def state_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the tensors (sorted by name: name, dtype, shape, raw bytes) and the metadata
    other than the checksum itself (sorted JSON)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rest = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


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

    def previous_path(self, model: str) -> Path:
        return self.dir / f"{model}.prev.safetensors"

    def save(self, model: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        target = self.path(model)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {**metadata, CHECKSUM_KEY: state_checksum(tensors, metadata)}
        fd, tmp = tempfile.mkstemp(prefix=f".{model}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            self._keep_previous(model, target)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _keep_previous(self, model: str, target: Path) -> None:
        """Hard-links the current state as the previous one (atomically, via a temp name), so that
        ``target`` exists at every moment."""
        if not target.exists():
            return
        link = self.dir / f".{model}.prev.{os.getpid()}.tmp"
        link.unlink(missing_ok=True)
        os.link(target, link)
        os.replace(link, self.previous_path(model))

    def load(self, model: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The saved state of ``model``, or None when it has none yet; a ConfigError naming the file
        when it is unreadable or fails its checksum."""
        target = self.path(model)
        if not target.exists():
            return None
        try:
            return self.read_verified(target)
        except ConfigError as exc:
            previous = self.previous_path(model)
            hint = "remove it to start this model afresh"
            try:
                _, meta = self.read_verified(previous)
                hint = (
                    f"the state before it, version {meta.get(VERSION_KEY)}, is intact in {previous}: move that to "
                    f"{target} to go back to it (the update after it is lost), or remove {target} to start afresh"
                )
            except ConfigError:
                pass
            raise ConfigError(f"{exc}; the server will not serve it: {hint}") from None

    @staticmethod
    def read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable state file ({exc})") from None
        expected = metadata.get(CHECKSUM_KEY)
        if expected is None:
            # Written before checksums (the format is otherwise the same): loaded as it stands, as
            # a state dir kept across the upgrade expects; the next update writes it with one.
            log.warning("%s: state file without a checksum (written by an earlier release); loaded unverified", path)
            return tensors, metadata
        if state_checksum(tensors, metadata) != expected:
            raise ConfigError(f"{path}: state file does not match its checksum (corrupted)")
        return tensors, metadata


def state_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """One state as checksummed safetensors bytes: how the Ray backend's discriminator owner
    publishes a version to its scoring replicas (through Ray's object store, no pickle)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(tensors, metadata={**metadata, CHECKSUM_KEY: state_checksum(tensors, metadata)})


def state_from_bytes(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The inverse of ``state_to_bytes``; ValueError naming ``what`` if the bytes do not match
    their checksum."""
    try:
        tensors = load(data)
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{what}: unreadable state ({exc})") from None
    if metadata.get(CHECKSUM_KEY) != state_checksum(tensors, metadata):
        raise ValueError(f"{what}: state does not match its checksum")
    return tensors, metadata

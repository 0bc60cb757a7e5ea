"""Shared by the trainer tests: a reference set on disk and metrics reading."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from advgrpo.trainer.references import write_synthetic_references

PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow sun"]


def make_reference_set(root: Path, per_prompt: int = 4, seed: int = 0) -> Path:
    return write_synthetic_references(root, PROMPTS, per_prompt=per_prompt, seed=seed)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run_dir: Path) -> dict[int, dict]:
    return {m["epoch"]: m for m in read_metrics(run_dir) if "reward_mean" in m}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""An optimizer's state as flat tensors plus JSON, for safetensors files: the server's
discriminator state and the trainer's checkpoints store optimizers the same way."""

from __future__ import annotations

import json

import torch


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
        idx, _, name = key[len(prefix) :].partition(".")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:  # JSON turns tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})

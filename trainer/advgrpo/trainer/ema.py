"""Exponential moving average of the trainable (LoRA) weights, used for eval and checkpoints.

Flow-GRPO keeps an EMA with decay 0.9 updated every 8 optimizer steps (about the last 80 steps on
average) and evaluates/saves the EMA weights. Its EMA also warms the decay up as
min(decay, (1 + n)/(10 + n)) at step n, so the first updates follow the fast-moving early weights
instead of averaging them with the initial LoRA for dozens of updates; we do the same by default
(``warmup=True``; it reaches 0.9 at step 80 and changes nothing after that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


class EMA:
    """fp32 shadow copies of a list of parameters, updated in place by ``step``.

    ``params``: tensors (named "0", "1", ...), ``(name, tensor)`` pairs or a ``{name: tensor}``
    mapping. The EMA keeps references to the live tensors: ``step`` reads them and ``swap_in``
    writes them.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
        *,
        decay: float = 0.9,
        update_every: int = 8,
        warmup: bool = True,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA: decay must be in [0, 1]")
        if update_every < 1:
            raise ValueError("EMA: update_every must be >= 1")
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        if items and isinstance(items[0], tuple):
            self.names = [str(n) for n, _ in items]
            self.params = [p for _, p in items]
        else:
            self.names = [str(i) for i in range(len(items))]
            self.params = items
        if len(set(self.names)) != len(self.names):
            raise ValueError("EMA: parameter names must be unique")
        self.decay = decay
        self.update_every = update_every
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def current_decay(self, global_step: int) -> float:
        """The decay an update at ``global_step`` uses."""
        if self.warmup:
            return min(self.decay, (1 + global_step) / (10 + global_step))
        return self.decay

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Call after optimizer step number ``global_step`` (1-based). Every ``update_every``-th step
        (global_step % update_every == 0) sets shadow = d*shadow + (1 - d)*param. Returns whether
        it updated."""
        if global_step % self.update_every:
            return False
        d = self.current_decay(global_step)
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.mul_(d).add_(p.detach().to(device=shadow.device, dtype=torch.float32), alpha=1 - d)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """``{"shadow.<name>": fp32 tensor, ..., "num_updates": int, "decay": float,
        "update_every": int}``: tensors and plain numbers only (safetensors + JSON friendly).
        The tensors are the live shadows; clone them if you keep them while training goes on."""
        out: dict[str, Any] = {f"shadow.{n}": s for n, s in zip(self.names, self.shadow, strict=True)}
        out.update(num_updates=self.num_updates, decay=self.decay, update_every=self.update_every)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores shadows and ``num_updates``. The hyperparameters stay those given to the
        constructor (the run's config), so a resumed run may change them."""
        expected = {f"shadow.{n}" for n in self.names}
        given = {k for k in state if k.startswith("shadow.")}
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise KeyError(f"EMA state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, shadow in zip(self.names, self.shadow, strict=True):
            t = state[f"shadow.{n}"]
            if t.shape != shadow.shape:
                raise ValueError(f"EMA state: shadow.{n} has shape {tuple(t.shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(t)
        self.num_updates = int(state.get("num_updates", self.num_updates))

    @contextlib.contextmanager
    def swap_in(self, params: Sequence[Tensor] | None = None) -> Iterator[None]:
        """Temporarily loads the EMA weights into ``params`` (default: the tracked tensors), e.g.
        for eval or saving, and restores the live weights on exit, also on error."""
        params = self.params if params is None else list(params)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA.swap_in: {len(params)} params for {len(self.shadow)} shadows")
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, shadow in zip(params, self.shadow, strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, backup, strict=True):
                    p.copy_(saved)

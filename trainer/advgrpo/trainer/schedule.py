"""When the discriminator (the adversarial reward) and the generator train, per epoch (Adv-GRPO).

Modes:

* ``"ratio"`` (Adv-GRPO with the DINO reward, k = 10): within every block of k epochs the
  discriminator trains on the first k-1 and the generator on the last one, i.e. D when
  ``epoch % k != k - 1`` and G when ``epoch % k == k - 1`` (epochs are 0-based). So a run starts
  by fitting D before G takes its first step against it, and 30 epochs with k = 10 give 27 D epochs
  and 3 G epochs (9, 19, 29). With k = 1 the generator trains every epoch and D never.
* ``"trigger"`` (Adv-GRPO with PickScore): the generator trains every epoch; D trains in the same
  epoch when the generated images' mean reward exceeds the references' (the generator has caught
  up with, or is exploiting, the reward). Without both means there is nothing to compare: no D.
* ``"off"``: a fixed reward; the generator trains every epoch, D never.

Pure functions of (epoch, means): no state, so resuming at any epoch gives the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["ratio", "trigger", "off"]


@dataclass(frozen=True)
class DiscriminatorSchedule:
    mode: Mode = "ratio"
    ratio_k: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ("ratio", "trigger", "off"):
            raise ValueError(f"DiscriminatorSchedule: unknown mode {self.mode!r} (ratio, trigger, off)")
        if self.ratio_k < 1:
            raise ValueError("DiscriminatorSchedule: ratio_k must be >= 1")

    def trains_discriminator(
        self, epoch: int, mean_generated_reward: float | None = None, mean_reference_reward: float | None = None
    ) -> bool:
        if self.mode == "ratio":
            return epoch % self.ratio_k != self.ratio_k - 1
        if self.mode == "trigger":
            if mean_generated_reward is None or mean_reference_reward is None:
                return False
            return mean_generated_reward > mean_reference_reward
        return False

    def trains_generator(
        self, epoch: int, mean_generated_reward: float | None = None, mean_reference_reward: float | None = None
    ) -> bool:
        del mean_generated_reward, mean_reference_reward  # only 'ratio' gates the generator, by epoch
        if self.mode == "ratio":
            return epoch % self.ratio_k == self.ratio_k - 1
        return True

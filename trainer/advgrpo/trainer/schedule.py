"""Which model trains in an epoch: the discriminator (the adversarial reward) or the generator.
Exactly one of them trains per epoch, as in Adv-GRPO's scripts (a discriminator epoch ends with
``continue`` before the generator's update).

Modes:

* ``"ratio"`` (Adv-GRPO with the DINO reward, ``d_times`` = k = 10): within every block of k epochs
  the discriminator trains on the first k-1 and the generator on the last one, i.e. D when
  ``epoch % k != k - 1`` (the original's ``(epoch + 1) % d_times != 0``; epochs are 0-based). A run
  starts by fitting D; 30 epochs with k = 10 give 27 D epochs and 3 G epochs (9, 19, 29). With
  k = 1 the generator trains every epoch and D never.
* ``"trigger"`` (Adv-GRPO with PickScore): the discriminator trains *instead of* the generator in
  an epoch whose generated images' mean reward is above the references' mean reward (the
  generator has caught up with, or is exploiting, the reward); otherwise the generator trains.
  Without both means there is nothing to compare: the generator trains.
* ``"off"``: a fixed reward; the generator trains every epoch, D never.

The means must be the same on every rank (gathered over all ranks' images), so that every rank
takes the same branch: a rank that trains D while another enters the generator's backward would
leave the collectives mismatched. Pure functions of (epoch, means): resuming at any epoch gives
the same schedule.
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
        """The complement of ``trains_discriminator``: one of the two trains in every epoch."""
        return not self.trains_discriminator(epoch, mean_generated_reward, mean_reference_reward)

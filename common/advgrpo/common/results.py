"""The reward service's results, one set for both sides: the server's host returns them (its
gRPC servicer and HTTP gateway turn them into the wire messages) and the client hands them back
to trainers (built from the same messages). Plain dataclasses; they import nothing of either side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GroupScore:
    """One group's scores (a ScoreResponse's GroupScores): the weighted reward of each image, each
    model's component scores, and the version of each model that scored the group."""

    group_id: str
    rewards: list[float]
    components: dict[str, list[float]]
    model_versions: dict[str, int]


@dataclass
class UpdateResult:
    """One discriminator update (an UpdateDiscriminatorResponse). ``replayed``: an update with this
    idempotency key had been applied already; this is its result, and nothing changed."""

    model: str
    version: int
    loss: float
    reference_score: float
    generated_score: float
    accuracy: float
    replayed: bool = False


@dataclass
class ModelInfo:
    """One served model (a ListModelsResponse's ModelInfo)."""

    name: str
    kind: str
    trainable: bool
    version: int
    default_weight: float

"""Wire messages <-> host types. Shared by the gRPC servicer and the HTTP JSON gateway."""

from __future__ import annotations

from typing import Sequence

from advgrpo.reward.v1 import reward_pb2

from .host import GroupInput, GroupResult, ModelHost, ModelStatus, UpdateOutcome
from .images import RAW, decode_image


def _decode_groups(groups: Sequence[reward_pb2.ImageGroup], field: str, max_side: int, shm) -> list[GroupInput]:
    return [
        GroupInput(
            g.group_id,
            g.prompt,
            [decode_image(img, f"{field}[{i}].images[{j}]", max_side, shm) for j, img in enumerate(g.images)],
        )
        for i, g in enumerate(groups)
    ]


async def decode_groups(host: ModelHost, groups: Sequence[reward_pb2.ImageGroup], field: str) -> list[GroupInput]:
    """Decodes and validates every image; PNG/JPEG decoding runs off the event loop."""
    max_side = host.config.server.max_image_side
    compressed = any(img.encoding != RAW for g in groups for img in g.images)
    if compressed:
        return await host.run_decode(_decode_groups, groups, field, max_side, host.shared_memory)
    return _decode_groups(groups, field, max_side, host.shared_memory)


async def score(host: ModelHost, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
    host.check_groups(request.groups)  # counts before any decoding work
    groups = await decode_groups(host, request.groups, "groups")
    results = await host.score(groups, dict(request.weights))
    return score_response(results)


def score_response(results: Sequence[GroupResult]) -> reward_pb2.ScoreResponse:
    out = reward_pb2.ScoreResponse()
    for r in results:
        g = out.groups.add(group_id=r.group_id, rewards=r.rewards)
        for name, values in r.components.items():
            g.components[name].values.extend(values)
        for name, version in r.model_versions.items():
            g.model_versions[name] = version
    return out


async def update(host: ModelHost, request: reward_pb2.UpdateDiscriminatorRequest) -> reward_pb2.UpdateDiscriminatorResponse:
    host.trainable_model(request.model)  # NOT_FOUND / FAILED_PRECONDITION before any decoding
    host.check_groups(request.references, "references")
    host.check_groups(request.generated, "generated")
    refs = await decode_groups(host, request.references, "references")
    gens = await decode_groups(host, request.generated, "generated")
    outcome = await host.update(request.model, refs, gens, request.steps, request.update_id)
    return update_response(outcome)


def update_response(o: UpdateOutcome) -> reward_pb2.UpdateDiscriminatorResponse:
    return reward_pb2.UpdateDiscriminatorResponse(
        model=o.model,
        version=o.version,
        loss=o.loss,
        reference_score=o.reference_score,
        generated_score=o.generated_score,
        accuracy=o.accuracy,
        replayed=o.replayed,
    )


def list_models_response(models: Sequence[ModelStatus]) -> reward_pb2.ListModelsResponse:
    return reward_pb2.ListModelsResponse(
        models=[
            reward_pb2.ModelInfo(
                name=m.name, trainable=m.trainable, version=m.version, kind=m.kind, default_weight=m.default_weight
            )
            for m in models
        ]
    )

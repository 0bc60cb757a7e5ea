"""Wire messages <-> host types and results (advgrpo.common.results, the client's too). Shared by
the gRPC servicer and the HTTP JSON gateway."""

from __future__ import annotations

from typing import Sequence

from advgrpo.common.images import RAW, decode_image, image_size
from advgrpo.common.results import GroupScore, ModelInfo, UpdateResult
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server.host import DecodedBytesTicket, GroupInput, ModelHost

Fields = Sequence[tuple[str, Sequence[reward_pb2.ImageGroup]]]  # (field name, its groups)


def _images(groups: Sequence[reward_pb2.ImageGroup], references: bool):
    """(group index, what, image index, Image) of every image the server decodes: each group's
    ``images``, then with ``references`` its ``references`` (Score; UpdateDiscriminator ignores them)."""
    for i, g in enumerate(groups):
        for j, img in enumerate(g.images):
            yield i, "images", j, img
        if references:
            for j, img in enumerate(g.references):
                yield i, "references", j, img


def _decode_request(
    host: ModelHost, fields: Fields, ticket: DecodedBytesTicket, references: bool = False
) -> list[list[GroupInput]]:
    """Checks every image's size and the request's decoded-bytes budget, takes its share of the
    server's (``ticket``), then decodes them all: nothing is decoded or copied out of shared
    memory before every check has passed. ``references``: each group's references too, decoded
    once per group (they count toward both budgets like images)."""
    server, shm = host.config.server, host.shared_memory
    limits = (server.max_image_side, shm, server.max_aspect_ratio)
    sizes, total = [], 0
    for field, groups in fields:
        for i, what, j, img in _images(groups, references):
            h, w, extra = image_size(img, f"{field}[{i}].{what}[{j}]", *limits)
            sizes.append((h, w))
            total += h * w * 3 + extra
    host.check_decoded_bytes(total, len(sizes))
    ticket.take(total, len(sizes))
    size = iter(sizes)
    out = []
    for field, groups in fields:
        decoded: list[GroupInput] = [GroupInput(g.group_id, g.prompt, []) for g in groups]
        for i, what, j, img in _images(groups, references):
            getattr(decoded[i], what).append(decode_image(img, f"{field}[{i}].{what}[{j}]", *limits, next(size)))
        out.append(decoded)
    return out


async def decode_request(
    host: ModelHost, fields: Fields, ticket: DecodedBytesTicket, references: bool = False
) -> list[list[GroupInput]]:
    """Decodes and validates every image of a request's image fields (one budget for them all;
    the request's share of the server's is taken on ``ticket``, to be released once it is
    answered); ``references``: the groups' references too. PNG/JPEG decoding and shared-memory
    reads run in the decode pool, off the event loop; a request of inline RAW images only (no work
    but wrapping the bytes) is decoded in place."""
    offload = any(
        img.encoding != RAW or img.shared_memory.name for _, groups in fields for *_, img in _images(groups, references)
    )
    if offload:
        return await host.run_decode(_decode_request, host, fields, ticket, references)
    return _decode_request(host, fields, ticket, references)


async def score(host: ModelHost, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
    # Before any decoding work: the models named, the counts, and references where a model needs them.
    host.check_groups(request.groups, references=True)
    weights = host.resolve_weights(dict(request.weights))
    host.check_references(request.groups, weights)
    # The versions asked for (ScoreRequest.min_versions), waited for before decoding: a request
    # waiting for a discriminator update holds none of the server's decoded-bytes budget.
    min_versions = await host.reach_min_versions(dict(request.min_versions))
    with host.decoded_bytes_held() as ticket:
        (groups,) = await decode_request(host, [("groups", request.groups)], ticket, references=True)
        results = await host.score(groups, weights, min_versions)
    return score_response(results)


def score_response(results: Sequence[GroupScore]) -> reward_pb2.ScoreResponse:
    out = reward_pb2.ScoreResponse()
    for r in results:
        g = out.groups.add(group_id=r.group_id, rewards=r.rewards)
        for name, values in r.components.items():
            g.components[name].values.extend(values)
        for name, version in r.model_versions.items():
            g.model_versions[name] = version
    return out


async def update(
    host: ModelHost, request: reward_pb2.UpdateDiscriminatorRequest
) -> reward_pb2.UpdateDiscriminatorResponse:
    host.trainable_model(request.model)  # NOT_FOUND / FAILED_PRECONDITION before any decoding
    host.check_groups(request.references, "references")
    host.check_groups(request.generated, "generated")
    with host.decoded_bytes_held() as ticket:
        refs, gens = await decode_request(
            host, [("references", request.references), ("generated", request.generated)], ticket
        )
        outcome = await host.update(request.model, refs, gens, request.steps, request.update_id)
    return update_response(outcome)


def update_response(o: UpdateResult) -> reward_pb2.UpdateDiscriminatorResponse:
    return reward_pb2.UpdateDiscriminatorResponse(
        model=o.model,
        version=o.version,
        loss=o.loss,
        reference_score=o.reference_score,
        generated_score=o.generated_score,
        accuracy=o.accuracy,
        replayed=o.replayed,
    )


def list_models_response(models: Sequence[ModelInfo]) -> reward_pb2.ListModelsResponse:
    return reward_pb2.ListModelsResponse(
        models=[
            reward_pb2.ModelInfo(
                name=m.name, trainable=m.trainable, version=m.version, kind=m.kind, default_weight=m.default_weight
            )
            for m in models
        ]
    )

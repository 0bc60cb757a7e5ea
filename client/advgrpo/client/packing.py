"""Dividing groups into Score calls and stitching the answers back.

A payload is packed into requests of at most a byte budget and an image count, in order, a group
split between requests where it does not fit (``pack_requests``); a big payload is divided into
a few similar calls to keep in flight at once (``call_budget``). Each request's answer is taken
apart by the (group, part) list it was sent with (``collect``) and the parts of each group joined
again (``merge_parts``), noting groups whose parts were scored under different model versions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import grpc

from advgrpo.client.encoding import FIELD_OVERHEAD, EncodedGroup, ScoreBatch
from advgrpo.client.types import ClientRpcError, GroupScore
from advgrpo.reward.v1 import reward_pb2

log = logging.getLogger(__name__)

PartList = list[tuple[int, int]]  # (group index, part number) of each group in a request


def pack_requests(
    encoded: Sequence[EncodedGroup],
    weights: dict[str, float] | None,
    budget: int,
    max_images: int,
    min_versions: dict[str, int] | None = None,
) -> Iterator[tuple[ScoreBatch, PartList]]:
    """Packs groups into requests of at most ``budget`` bytes and ``max_images`` images, in order,
    filling each request image by image: a group that does not fit the room left is split there
    (one image always goes, so an image bigger than the budget travels alone). Every request but
    the last thus holds more than ``budget`` minus one image, or ``max_images`` images. Sizes are
    summed from the image bytes (protobuf's ByteSize() walks 12 MB per call).

    A group with references is one unit, never split: each image is scored against all of them,
    and they count toward the request's bytes and images like images do. It goes whole where it
    fits the room left, else it starts a new request (alone, it goes even if over a limit: the
    server then refuses it).

    Every request carries ``weights`` and ``min_versions`` (ScoreRequest.min_versions) whole."""

    def new_batch() -> ScoreBatch:
        return ScoreBatch([], dict(weights or {}), dict(min_versions or {}))

    batch = new_batch()
    parts: PartList = []
    size = count = 0  # bytes and images in ``batch``
    for enc in encoded:
        if enc.references:
            whole, n = enc.nbytes(), enc.image_count()
            if parts and (size + whole > budget or count + n > max_images):
                yield batch, parts
                batch, parts, size, count = new_batch(), [], 0, 0
            batch.groups.append(enc)
            parts.append((enc.index, 0))
            size += whole
            count += n
            continue
        head, images = enc.head_bytes(), enc.images
        start = part_no = 0
        while True:
            taken, piece_size = start, head  # images[start:taken] fit the room left
            while taken < len(images):
                image_size = len(images[taken][3]) + FIELD_OVERHEAD
                if size + piece_size + image_size > budget or count + taken - start >= max_images:
                    break
                piece_size += image_size
                taken += 1
            if taken == start and parts and (start < len(images) or size + head > budget):
                yield batch, parts  # no room left: the rest goes in a new request
                batch, parts, size, count = new_batch(), [], 0, 0
                continue
            if taken == start < len(images):  # alone, and still over the budget: it goes anyway
                piece_size += len(images[taken][3]) + FIELD_OVERHEAD
                taken += 1
            batch.groups.append(EncodedGroup(enc.index, enc.group_id, enc.prompt, images[start:taken]))
            parts.append((enc.index, part_no))
            size += piece_size
            count += taken - start
            start, part_no = taken, part_no + 1
            if start >= len(images):
                break
    if parts:
        yield batch, parts


def call_budget(encoded: Sequence[EncodedGroup], chunk_bytes: int, parallel_calls: int, min_call_bytes: int) -> int:
    """Bytes per Score call for ``encoded``: the message budget ``chunk_bytes``, or for a payload
    worth dividing, about 1/n of it (n <= parallel_calls, each part >= min_call_bytes) plus one
    image (or one whole group with references: those are not split) and a group header, so that
    ``pack_requests`` ends with at most n calls."""
    total = sum(e.nbytes() for e in encoded)
    n = min(parallel_calls, total // min_call_bytes)
    if n < 2:
        return chunk_bytes
    largest = max(
        (e.nbytes() if e.references else len(data) + FIELD_OVERHEAD for e in encoded for *_, data in e.images),
        default=0,
    )
    head = max(e.head_bytes() for e in encoded)
    return min(chunk_bytes, -(-total // n) + largest + head)


@dataclass
class Part:
    index: int  # the group's position in the caller's sequence
    part: int  # which piece of a split group
    score: GroupScore


def collect(response: reward_pb2.ScoreResponse, parts: PartList) -> list[Part]:
    """A request's answer, one ``Part`` per group it carried. A NaN or infinite value is refused
    (our server never sends one; another implementation of the contract might): a failure is
    never a reward."""
    if len(response.groups) != len(parts):
        raise RuntimeError(f"server answered {len(response.groups)} groups for {len(parts)} sent")
    for g in response.groups:
        for name, values in [
            ("rewards", g.rewards),
            *((f"components[{k!r}]", v.values) for k, v in g.components.items()),
        ]:
            bad = [i for i, x in enumerate(values) if not math.isfinite(x)]
            if bad:
                raise ClientRpcError(
                    grpc.StatusCode.INTERNAL,
                    f"group {g.group_id!r}: the server sent {name}[{bad[0]}] = {values[bad[0]]}; refused, not a reward",
                )
    return [
        Part(
            index,
            part_no,
            GroupScore(
                g.group_id,
                list(g.rewards),
                {k: list(v.values) for k, v in g.components.items()},
                dict(g.model_versions),
            ),
        )
        for g, (index, part_no) in zip(response.groups, parts, strict=True)
    ]


def merge_parts(parts: list[Part]) -> tuple[list[GroupScore], list[int]]:
    """Stitches the pieces of split groups back together, in group order; also the indices of
    groups whose pieces were scored under different model versions (an update between calls)."""
    by_index: dict[int, list[Part]] = {}
    for p in parts:
        by_index.setdefault(p.index, []).append(p)
    merged, straddled = [], []
    for index in sorted(by_index):
        pieces = [p.score for p in sorted(by_index[index], key=lambda p: p.part)]
        first = pieces[0]
        for p in pieces[1:]:
            if p.model_versions != first.model_versions:
                straddled.append(index)
            first.rewards.extend(p.rewards)
            for k, v in p.components.items():
                first.components[k].extend(v)
            for k, v in p.model_versions.items():
                first.model_versions[k] = max(first.model_versions.get(k, v), v)
        merged.append(first)
    return merged, sorted(set(straddled))


def merge_stream_parts(parts: list[Part]) -> GroupScore:
    """One streamed group's pieces. A stream does not score a group again, so one that straddled an
    update is reported under the newest version involved, and logged."""
    (merged,), straddled = merge_parts(parts)
    if straddled:
        log.warning("group %r: its parts were scored under different model versions", merged.group_id)
    return merged

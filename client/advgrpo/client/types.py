"""What a caller hands the client (``Group``) and gets back: the result types, shared with the
server (advgrpo.common.results), and ``ClientRpcError`` for failures the client detects itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from advgrpo.common.results import GroupScore, ModelInfo, UpdateResult

__all__ = ["ClientRpcError", "Group", "GroupScore", "ModelInfo", "UpdateResult"]


@dataclass
class Group:
    """One prompt's images. ``images``: PIL images, uint8 HWC arrays, or float CHW/HWC tensors in [0, 1].

    ``references``: the prompt's reference images (same types), for models that compare each image
    with them (kind "dino_similarity"); other models ignore them. A group with references always
    travels whole, with all of them, in one Score request (never split across calls), and they
    count toward the request's images (``max_images_per_call``) and bytes. ``score`` only:
    ``update_discriminator`` takes its references as its own argument."""

    prompt: str
    images: Sequence[Any]
    group_id: str = ""
    references: Sequence[Any] = ()


class ClientRpcError(grpc.RpcError):
    """A failure the client itself detected, shaped like grpc's errors (``code()``, ``details()``):
    ``score_stream``'s ``DEADLINE_EXCEEDED`` when the server leaves its messages unanswered."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple:
        return ()

    def trailing_metadata(self) -> tuple:
        return ()

    def debug_error_string(self) -> str:
        return str(self)

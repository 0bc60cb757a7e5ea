"""The RewardService servicer: thin. Conversion lives in ``convert``, logic in ``ModelHost``,
errors/auth/metrics in the interceptors."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .. import convert
from ..errors import RewardError
from ..host import ModelHost


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, host: ModelHost):
        self.host = host

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        return await convert.score(self.host, request)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[reward_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reward_pb2.ScoreResponse]:
        """Scores up to ``max_stream_inflight`` requests at once; answers strictly in request order."""
        limit = self.host.config.server.max_stream_inflight
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=limit)

        async def read_requests() -> None:
            index = 0
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.create_task(self._score_indexed(request, index)))
                    index += 1
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def _score_indexed(self, request: reward_pb2.ScoreRequest, index: int) -> reward_pb2.ScoreResponse:
        try:
            return await convert.score(self.host, request)
        except RewardError as exc:
            # Name the message so a client can tell which group of its stream was refused.
            raise type(exc)(f"stream message {index}: {exc}") from None

    async def UpdateDiscriminator(self, request: reward_pb2.UpdateDiscriminatorRequest, context):
        return await convert.update(self.host, request)

    async def ListModels(self, request: reward_pb2.ListModelsRequest, context):
        return convert.list_models_response(self.host.list_models())

"""The RewardService servicer: thin. Conversion lives in ``convert``, logic in the host (``ModelHost``,
or the Ray backend's ``RayHost``, which answer the same calls), errors/auth/metrics in the
interceptors.

Every method receives its request as the bytes gRPC read and parses them itself: Score, ScoreStream
and UpdateDiscriminator with ``wire.parse`` (pixels stay views into those bytes, and a malformed message becomes
INVALID_ARGUMENT through the error interceptor rather than a deserialisation failure)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from advgrpo.common import shared_memory
from advgrpo.common.errors import RewardError
from advgrpo.common.protocol import STREAM_OPEN_KEY
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server import convert, wire

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, host):
        self.host = host

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers RewardService like the generated ``add_RewardServiceServicer_to_server``, but
        with raw-bytes requests for the image-carrying methods."""
        pb = reward_pb2
        handlers = {
            "Score": grpc.unary_unary_rpc_method_handler(
                self.Score, response_serializer=pb.ScoreResponse.SerializeToString
            ),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(
                self.ScoreStream, response_serializer=pb.ScoreResponse.SerializeToString
            ),
            "UpdateDiscriminator": grpc.unary_unary_rpc_method_handler(
                self.UpdateDiscriminator, response_serializer=pb.UpdateDiscriminatorResponse.SerializeToString
            ),
            # Parsed here too: gRPC's deserialiser runs outside the interceptors, and bytes that
            # do not parse came back UNKNOWN (found by bench/fuzz.py).
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
            ),
            "CheckSharedMemory": grpc.unary_unary_rpc_method_handler(
                self.CheckSharedMemory, response_serializer=pb.CheckSharedMemoryResponse.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)

    async def Score(self, request: bytes, context: grpc.aio.ServicerContext):
        return await self.host.score_message(wire.parse(reward_pb2.ScoreRequest, request), request)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reward_pb2.ScoreResponse]:
        """Scores up to ``max_stream_inflight`` requests at once; answers strictly in request order."""
        limit = self.host.config.server.max_stream_inflight
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=limit)
        # Headers now, not with the first answer: the client learns the stream is up even while
        # it has nothing to send (and so that a later failure is a new outage, not this one).
        await context.send_initial_metadata(((STREAM_OPEN_KEY, "1"),))

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

    async def _score_indexed(self, request: bytes, index: int) -> reward_pb2.ScoreResponse:
        try:
            return await self.host.score_message(wire.parse(reward_pb2.ScoreRequest, request), request)
        except RewardError as exc:
            # Name the message so a client can tell which group of its stream was refused.
            raise type(exc)(f"stream message {index}: {exc}", retry_after_s=exc.retry_after_s) from None

    async def UpdateDiscriminator(self, request: bytes, context):
        message = wire.parse(reward_pb2.UpdateDiscriminatorRequest, request)
        return await self.host.update_message(message, request)

    async def ListModels(self, request: bytes, context):
        wire.parse_plain(reward_pb2.ListModelsRequest, request)
        return convert.list_models_response(await self.host.describe_models())

    async def CheckSharedMemory(self, request: bytes, context):
        request = wire.parse_plain(reward_pb2.CheckSharedMemoryRequest, request)
        readable, detail = await self.host.run_decode(  # a file read: off the event loop
            shared_memory.check_readable, self.host.shared_memory, request.slice, request.expected
        )
        return reward_pb2.CheckSharedMemoryResponse(readable=readable, detail=detail)

"""The Python client trainers import: ``RewardClient("127.0.0.1:50051").score([...])``.

It encodes tensors/arrays/PIL images (raw RGB8 by default: cheapest to encode and to decode),
splits groups that exceed the message budget or image count into several requests and stitches
the answers back, sets a deadline on every call (and on every unanswered stream message), and
retries UNAVAILABLE with exponential backoff within a time budget (gRPC's own retry first).
Discriminator updates carry an idempotency key, so retrying them is safe too.

Installable alone (advgrpo-client): grpcio, protobuf, numpy and pillow, plus advgrpo-protos and
advgrpo-common; no torch, no server code. One module per job:

    types          Group, the result types (shared with the server: advgrpo.common.results), ClientRpcError
    encoding       images as sent, and the image-carrying requests in protobuf's wire format
    packing        groups into Score calls, and their answers back into groups
    retry          RetryPolicy: gRPC's own retry (service config, pushback) and our time budget
    shared_memory  the client's shared-memory segments for a server on this host
    stream         score_stream's state machine: replaying a failed stream
    health         the grpc.health.v1 check without grpcio-health-checking
    client         RewardClient

What is imported from here is the public API; the modules' own names may change.
"""

from advgrpo.client.client import RewardClient
from advgrpo.client.retry import RetryPolicy
from advgrpo.client.types import ClientRpcError, Group, GroupScore, ModelInfo, UpdateResult

__all__ = ["ClientRpcError", "Group", "GroupScore", "ModelInfo", "RetryPolicy", "RewardClient", "UpdateResult"]

"""advgrpo reward server: reward models (PickScore, OCR, DINOv2 discriminator) behind gRPC.

Model code (``reward_server.models``) knows nothing of gRPC; ``reward_server.host`` owns the
models, their batchers and their durable state; ``reward_server.rpc`` and ``reward_server.http``
are thin front ends over the host. Trainers import ``reward_server.client``.
"""

__version__ = "0.1.0"

"""advgrpo reward server: reward models (PickScore, OCR, DINOv2 discriminator) behind gRPC.

Model code (``advgrpo.reward_server.models``) knows nothing of gRPC; ``advgrpo.reward_server.host`` owns the
models, their batchers and their durable state; ``advgrpo.reward_server.rpc`` and ``advgrpo.reward_server.web``
are thin front ends over the host. Trainers import ``advgrpo.client``.
"""

__version__ = "0.1.0"

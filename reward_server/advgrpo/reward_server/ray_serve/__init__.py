"""``--backend ray``: the reward server as one Ray Serve application.

Three kinds of deployment (``app.build_application``):

* ``RewardIngress`` (one replica): our own grpc.aio front end and HTTP side, unchanged (auth, TLS,
  limits, health, reflection, metrics, dashboard), serving ``advgrpo.reward.v1`` on ``--port``. It
  calls the other deployments through Serve handles.
* scoring deployments (``ray.deployments``; by default one, ``rewards``, hosting every model):
  ``ScoringReplica`` processes, each a ``ModelHost`` with our dynamic batcher, ``--replicas`` of
  them (or Serve's autoscaling), with fractional GPUs.
* ``DiscriminatorOwner`` (one replica): the only process that applies ``UpdateDiscriminator``
  and writes the durable state, exactly as the single server does. It publishes every version
  to the object store; scoring replicas follow it (a long poll) and catch up on demand when a
  request's ``min_versions`` asks for a version they do not have yet.

Ray is an optional install (``advgrpo-reward-server[ray]``): nothing outside this package imports it.
"""

"""The Ray Serve application: what ``--backend ray`` deploys, and what ``serve deploy`` builds.

    ingress (RewardIngress, 1 replica)  --handles-->  scoring deployments (ScoringReplica, N each)
                     |                                            | long poll, object store
                     +--UpdateDiscriminator-->  DiscriminatorOwner (1 replica, state dir)

``serve deploy`` / a KubeRay RayService names ``advgrpo.reward_server.ray_serve.app:app_builder``
as an application's ``import_path``; its ``args`` are the CLI's: ``preset``, ``config`` (a YAML
file on every node), ``replicas``, ``port``, ``http_port``, ``host``, ``state_dir``,
``insecure``, ``tokens_file``, ``tls_cert``, ``tls_key``, ``tls_client_ca`` (docs/RAY.md).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.config import ServerConfig, config_mapping, load_config
from advgrpo.reward_server.ray_serve.ingress import RewardIngress
from advgrpo.reward_server.ray_serve.replica import OWNER, DiscriminatorOwner, ScoringReplica

INGRESS = "RewardIngress"
# Long polls from every scoring replica wait at the owner: they must not count as its load.
OWNER_MAX_ONGOING = 1000


def check_durable(config: ServerConfig) -> None:
    """Trainable models on this backend need a state dir: Serve restarts a failed owner on its own,
    and without the durable state it would come back at version 0 behind its replicas, with every
    acknowledged update lost."""
    trainable = [m.name for m in config.models if m.trainable]
    if trainable and config.server.state_dir is None:
        raise ConfigError(
            f"--backend ray with trainable models ({', '.join(trainable)}) needs --state-dir (server.state_dir): "
            "the discriminator owner restarts from it, so that no acknowledged update is lost"
        )


def build_application(config: ServerConfig) -> Application:
    ray = config.ray
    config_map = config_mapping(config)
    trainable = [m.name for m in config.models if m.trainable]
    owner = None
    if trainable:
        owner = (
            serve.deployment(DiscriminatorOwner)
            .options(
                name=OWNER,
                num_replicas=1,
                max_ongoing_requests=OWNER_MAX_ONGOING,
                ray_actor_options={
                    "num_cpus": ray.owner_num_cpus,
                    "num_gpus": ray.owner_num_gpus,
                    "resources": dict(ray.owner_resources),
                },
                health_check_period_s=ray.health_check_period_s,
                health_check_timeout_s=ray.health_check_timeout_s,
            )
            .bind(config_map, trainable, ray.sync_poll_s)
        )
    scorers = {}
    for name, dep in config.scoring_deployments().items():
        options: dict[str, Any] = {
            "name": name,
            "max_ongoing_requests": dep.max_ongoing_requests,
            "max_queued_requests": dep.max_queued_requests,
            "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus},
            "health_check_period_s": ray.health_check_period_s,
            "health_check_timeout_s": ray.health_check_timeout_s,
        }
        if dep.autoscaling is not None:
            options["autoscaling_config"] = dep.autoscaling
        else:
            options["num_replicas"] = dep.num_replicas or ray.replicas
        bound = (
            serve.deployment(ScoringReplica)
            .options(**options)
            .bind(config_map, dep.models, name, owner, ray.sync_poll_s)
        )
        scorers[name] = (bound, list(dep.models))
    return (
        serve.deployment(RewardIngress)
        .options(
            name=INGRESS,
            num_replicas=1,
            # The front end's own limits (server.max_concurrent_rpcs) apply inside it; the handle
            # calls from the CLI (ready_info, drain) are all Serve sees.
            max_ongoing_requests=100,
            ray_actor_options={"num_cpus": ray.ingress_num_cpus, "resources": dict(ray.ingress_resources)},
            health_check_period_s=ray.health_check_period_s,
            health_check_timeout_s=ray.health_check_timeout_s,
        )
        .bind(config_map, scorers, owner)
    )


def app_builder(args: dict[str, Any]) -> Application:
    """``serve deploy``'s entry point (``import_path: advgrpo.reward_server.ray_serve.app:app_builder``)."""
    server_keys = ("port", "http_port", "host", "state_dir", "insecure", "tokens_file", "tls_cert", "tls_key",
                   "tls_client_ca")  # fmt: skip
    known = {"preset", "config", "replicas", *server_keys}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"args.{unknown[0]}: unknown (known: {', '.join(sorted(known))})")
    server = {k: args[k] for k in server_keys if k in args}
    overrides: dict[str, Any] = {"server": server}
    if "replicas" in args:
        overrides["ray"] = {"replicas": int(args["replicas"])}
    preset = args.get("preset") or (None if args.get("config") else "sd3-adv")
    config = load_config(preset, args.get("config"), overrides)
    check_durable(config)
    return build_application(config)

"""The Ray backend's configuration and deployment files, without starting Ray: the ``ray`` config
section's checks, the CLI's flags, ``serve deploy``'s config file and the KubeRay manifest, and
the application they build (deployments, replicas, GPUs, autoscaling, pinned resources)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

pytest.importorskip("ray", reason="the Ray backend needs advgrpo-reward-server[ray]")

from ray.serve._private.build_app import build_app  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from advgrpo.common.errors import ConfigError  # noqa: E402
from advgrpo.reward_server.config import build_config, config_mapping, load_config  # noqa: E402
from advgrpo.reward_server.ray_serve.app import app_builder, build_application  # noqa: E402

from .conftest import REPO  # noqa: E402

SERVE_CONFIG = REPO / "docker/ray/serve-config.yaml"
RAYSERVICE = REPO / "docker/ray/rayservice.yaml"
GPU_CONFIG = REPO / "docker/ray/sd3-adv-ray.yaml"


@pytest.mark.parametrize(
    "ray, fragment",
    [
        ({"replicas": 0}, "ray.replicas"),
        ({"deployments": {"a": {"models": ["nope"]}}}, "'nope' is not a configured model"),
        ({"deployments": {"a": {"models": []}}}, "ray.deployments.a.models: names no model"),
        ({"deployments": {"a": {"models": ["dino"]}, "b": {"models": ["dino"]}}}, "already hosted"),
        ({"deployments": {"a": {"models": ["dino"]}}}, "no deployment hosts model 'pickscore'"),
        ({"deployments": {"a b": {"models": ["dino"]}}}, "deployment name"),
        ({"deployments": {"a": {"models": ["dino"], "max_queued_requests": 0}}}, "max_queued_requests"),
        ({"sync_poll_s": 0}, "ray.sync_poll_s"),
        ({"unknown": 1}, "ray.unknown"),
    ],
)
def test_bad_ray_settings_are_config_errors_naming_the_key(ray, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides={"ray": ray})
    assert fragment in str(info.value)


def test_the_config_round_trips_through_its_mapping_with_secrets():
    config = load_config("tiny", overrides={"server": {"auth_token": "s" * 20}, "ray": {"replicas": 3}})
    again = build_config(config_mapping(config))
    assert again == config and again.server.auth_token == "s" * 20
    assert list(config.scoring_deployments()) == ["rewards"]
    assert config.scoring_deployments()["rewards"].models == ["dino", "pickscore", "ocr", "dino_similarity"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_replicas_needs_the_ray_backend_and_print_config_shows_the_ray_section():
    refused = run_cli("--preset", "tiny", "--replicas", "2", "--print-config")
    assert refused.returncode == 2 and "--replicas: only with --backend ray" in refused.stderr
    # Trainable models on Ray need durable state (an owner restarted by Serve resumes from it).
    no_state = run_cli("--preset", "tiny", "--backend", "ray", "--no-http")
    assert no_state.returncode == 2 and "needs --state-dir" in no_state.stderr
    shown = run_cli("--preset", "tiny", "--backend", "ray", "--replicas", "3", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["ray"]["replicas"] == 3


def deployments(app) -> dict:
    return {d.name: d for d in build_app(app, name="advgrpo-reward").deployments}


def test_the_default_application_is_ingress_owner_and_one_scoring_deployment():
    built = deployments(build_application(load_config("tiny", overrides={"ray": {"replicas": 2}})))
    assert set(built) == {"RewardIngress", "DiscriminatorOwner", "rewards"}
    assert built["rewards"]._deployment_config.num_replicas == 2
    assert built["RewardIngress"]._deployment_config.num_replicas == 1
    assert built["DiscriminatorOwner"]._deployment_config.num_replicas == 1
    # A preset without trainable models has no owner.
    assert set(deployments(build_application(load_config("noop")))) == {"RewardIngress", "rewards"}


def test_serve_deploy_config_and_rayservice_build_the_gpu_application(tmp_path):
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` checks
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    (app,) = serve_config["applications"]
    assert embedded["applications"][0]["import_path"] == app["import_path"]
    assert embedded["applications"][0]["args"]["replicas"] == app["args"]["replicas"]
    # The head group declares the resources the GPU config pins the ingress and the owner to.
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"]
    gpu = yaml.safe_load(GPU_CONFIG.read_text())
    for key in ("ingress_resources", "owner_resources"):
        for resource in gpu["ray"][key]:
            assert f'\\"{resource}\\"' in head or f'"{resource}"' in head

    tokens = tmp_path / "tokens"
    tokens.write_text("t" * 24 + " update\n")
    args = {**app["args"], "config": str(GPU_CONFIG), "tokens_file": str(tokens), "state_dir": str(tmp_path)}
    built = deployments(app_builder(args))
    assert set(built) == {"RewardIngress", "DiscriminatorOwner", "discriminator", "pickscore", "similarity", "ocr"}
    for name in ("discriminator", "pickscore", "similarity"):
        assert built[name].ray_actor_options["num_gpus"] == 0.25
        assert built[name]._deployment_config.num_replicas == app["args"]["replicas"]
    assert built["ocr"]._deployment_config.autoscaling_config.max_replicas == 8
    assert built["RewardIngress"].ray_actor_options["resources"] == {"advgrpo-ingress": 1}
    assert built["DiscriminatorOwner"].ray_actor_options["resources"] == {"advgrpo-state": 1}
    with pytest.raises(ValueError, match="args.nope"):
        app_builder({**args, "nope": 1})

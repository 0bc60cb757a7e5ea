"""The docker/compose files and the console entry point agree with the code (no Docker engine here:
the files are validated, and the server command they run is run locally)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from .docker_helpers import DOCKERFILES, REPO, Dockerfile, dockerfile_instructions, load_compose


def test_compose_services_build_from_files_that_exist():
    compose = load_compose()
    server = compose["services"]["reward-server"]
    build = server["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    ports = {p.split(":")[-1] for p in server["ports"]}
    assert ports == {"50051", "8080"}
    assert "reward-state" in compose["volumes"]


def test_reward_server_dockerfile_copies_existing_paths_and_runs_a_valid_command():
    instructions = dockerfile_instructions(REPO / "docker/reward-server.Dockerfile")
    for op, rest in instructions:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY source {src} missing"
    entry = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in instructions if op == "CMD"))
    assert entry[0] == "advgrpo-reward-server"
    # The exact arguments the container runs, parsed by our CLI. It listens on 0.0.0.0: with no
    # token it refuses to start (the compose stack passes --insecure, its ports loopback-published).
    argv = [sys.executable, "-m", "advgrpo.reward_server", *entry[1:], *cmd, "--print-config"]
    env = {k: v for k, v in os.environ.items() if k not in ("ADVGRPO_AUTH_TOKEN", "ADVGRPO_TOKENS")}
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert refused.returncode == 2 and "--insecure" in refused.stderr, refused.stderr
    env["ADVGRPO_AUTH_TOKEN"] = "a-token-for-the-test"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["server"]["port"] == 50051 and config["server"]["http_port"] == 8080
    assert config["server"]["state_dir"] == "/state"
    # The image's default: the toy world's discriminator, shipped inside it (no downloads).
    assert set(config["models"]) == {"dino", "saturation", "dino_similarity"}
    assert config["models"]["dino"]["params"]["backbone"] == "toy"


@pytest.mark.slow
def test_the_docker_images_files_build_a_server_that_starts(image_env, tmp_path):
    """The image is built from the files its Dockerfile copies (its build context, as .dockerignore
    leaves it: nothing the checkout generated): those must build wheels (setup.py generating the
    gRPC modules) whose server starts on the tiny preset, with every model, in an environment that
    has only those wheels and the dependencies."""
    units = Dockerfile.parse(DOCKERFILES["reward-server"]).installed_units()
    assert {"protos", "common", "client", "kernels", "reward_server"} <= set(units), units
    env = image_env("reward-server")
    names = set()
    for wheel in env.wheels:
        with zipfile.ZipFile(wheel) as z:
            names |= set(z.namelist())
    assert {
        "advgrpo/reward/v1/reward_pb2.py",
        "advgrpo/reward/v1/reward_pb2_grpc.py",
        "advgrpo/kernels/__init__.py",
    } <= names
    assert not any(n.startswith("advgrpo/__init__") for n in names), "advgrpo/ is a namespace package"
    assert env.console_scripts()["advgrpo-reward-server"] == "advgrpo.reward_server.cli:main"

    # A bare environment: the wheels unpacked in its site-packages, the dependencies reached through
    # a plain path entry (which, unlike our .venv's own site dir, does not run the checkout's
    # editable hook), and no PYTHONPATH into the checkout.
    proc = subprocess.Popen(
        [str(env.python), "-m", "advgrpo.reward_server", "--preset", "tiny", "--port", "0", "--no-http"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env(),
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        ready = json.loads(line)
        assert {m["name"] for m in ready["models"]} == {"dino", "pickscore", "ocr", "dino_similarity"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    where = subprocess.run(
        [str(env.python), "-c", "import advgrpo.reward_server, advgrpo.reward.v1.reward_pb2 as pb; print(advgrpo.reward_server.__file__, pb.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env=env.env(),
    ).stdout.split()  # fmt: skip
    assert all(Path(f).is_relative_to(env.site) for f in where), where


@pytest.mark.slow
def test_the_trainer_images_files_build_a_trainer_without_the_server(image_env, tmp_path):
    env = image_env("trainer")
    assert {w.name.split("-")[0] for w in env.wheels} == {
        "advgrpo_protos",
        "advgrpo_common",
        "advgrpo_client",
        "advgrpo_trainer",
    }
    assert {"advgrpo-train", "advgrpo-generate"} <= set(env.console_scripts())
    code = (
        "import importlib.util, advgrpo.trainer.loop, advgrpo.trainer.healthcheck as h, advgrpo.reward.v1.reward_pb2;"
        "print(h.__file__, importlib.util.find_spec('advgrpo.reward_server'))"
    )
    out = subprocess.run(
        [str(env.python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env.env()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    where, spec = out.stdout.split()
    assert Path(where).is_relative_to(env.site) and spec == "None", out.stdout


CLIENT_BLOCKED = [
    # the server extra's packages
    "torch", "transformers", "safetensors", "blake3", "grpc_reflection", "rapidocr_onnxruntime", "rapidfuzz",
    "starlette", "uvicorn", "prometheus_client",
    # what the client must not need either: grpcio-health-checking (its own health.proto copy),
    # config loading, and every unit but protos and common
    "grpc_health", "yaml", "advgrpo.reward_server", "advgrpo.trainer", "advgrpo.kernels",
]  # fmt: skip


def _blocked_client_run(body: str, *args: str) -> subprocess.CompletedProcess:
    """``body`` in a fresh interpreter where importing any of CLIENT_BLOCKED raises ImportError."""
    code = (
        "import sys\n"
        f"BLOCKED = {CLIENT_BLOCKED!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == b or name.startswith(b + '.') for b in BLOCKED):\n"
        "            raise ImportError('server-only module imported: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        + body
        + "loaded = [m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in BLOCKED)]\n"
        "assert not loaded, loaded\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


CLIENT_DEPENDENCIES = {"advgrpo-protos", "advgrpo-common", "grpcio", "protobuf", "numpy", "pillow"}


def test_the_client_and_commons_base_depend_on_grpcio_protobuf_numpy_and_pillow_only():
    import tomllib

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}

    for unit in ("client", "common", "protos"):
        project = tomllib.loads((REPO / unit / "pyproject.toml").read_text())["project"]
        assert names(project["dependencies"]) <= CLIENT_DEPENDENCIES, unit
    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert "optional-dependencies" not in client  # nothing to add: the client is its base


def test_the_client_imports_without_the_server_extras():
    """Trainers install the base package (plus their own extra): the client must not need torch,
    transformers, the HTTP stack or anything else only the server extra brings."""
    out = _blocked_client_run("from advgrpo.client import RewardClient, Group\nRewardClient('127.0.0.1:1').close()\n")
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_the_client_alone_checks_health_waits_and_scores_against_a_real_server(tmp_path):
    """advgrpo-client's dependencies only (grpcio, protobuf, numpy, pillow; advgrpo-protos and
    advgrpo-common): health() and wait_ready() without grpcio-health-checking, then real calls."""
    from advgrpo.common.process import ServerProcess

    cfg = tmp_path / "noop.yaml"
    cfg.write_text("models:\n  noop: {kind: noop, weight: 1.0, params: {value: 0.25}}\n")
    body = (
        "import json\n"
        "import numpy as np\n"
        "from advgrpo.client import Group, RewardClient\n"
        "with RewardClient(sys.argv[1]) as client:\n"
        "    client.wait_ready(60)\n"
        "    out = {'health': client.health(), 'service': client.health('advgrpo.reward.v1.RewardService'),\n"
        "           'models': [m.name for m in client.list_models()],\n"
        "           'rewards': client.score([Group('p', [np.zeros((4, 4, 3), np.uint8)] * 2)])[0].rewards,\n"
        "           'streamed': [s.rewards for s in client.score_stream([Group('p', [np.zeros((4, 4, 3), np.uint8)])])]}\n"
        "print(json.dumps(out))\n"
    )
    with ServerProcess(["--config", str(cfg)], http=False) as server:
        out = _blocked_client_run(body, server.target)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "health": "SERVING",
        "service": "SERVING",
        "models": ["noop"],
        "rewards": [0.25, 0.25],
        "streamed": [[0.25]],
    }


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "advgrpo-reward-server"
    assert script.exists()
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--state-dir" in out.stdout


def test_config_errors_name_the_key_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  dino:\n    kind: dino\n    params: {lr: fast}\n")
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", "--config", str(bad), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "models.dino.params.lr" in out.stderr and "Traceback" not in out.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("server:\n  prot: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", "--config", str(unknown), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2 and "server.prot: unknown key" in out.stderr


def test_accelerate_configs_parse_and_the_cpu_one_launches_the_trainer(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO / "trainer" / "accelerate-configs").glob("*.yaml"))
    kinds = {p.stem: load_config_from_file(str(p)) for p in configs}
    assert kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["multi_node_zero2"].num_machines == 2
    # The real launcher, with the CPU config, starts our entry point (it only prints the config).
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "trainer/accelerate-configs/single_cpu.yaml"),
            "-m",
            "advgrpo.trainer.train",
            "--preset",
            "tiny",
            "--set",
            "adversarial.discriminator=",
            "--set",
            "data.prompts=prompts.txt",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["pretrained"] == "toy"

"""The docker/compose files and the console entry point agree with the code (no Docker engine here:
the files are validated, and the server command they run is run locally)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_compose_services_build_from_files_that_exist():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
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
    # The exact arguments the container runs, parsed by our CLI.
    out = subprocess.run(
        [sys.executable, "-m", "reward_server", *entry[1:], *cmd, "--print-config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["server"]["port"] == 50051 and config["server"]["http_port"] == 8080
    assert config["server"]["state_dir"] == "/state" and set(config["models"]) == {"dino", "pickscore", "ocr"}


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
        [sys.executable, "-m", "reward_server", "--config", str(bad), "--print-config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 2
    assert "models.dino.params.lr" in out.stderr and "Traceback" not in out.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("server:\n  prot: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "reward_server", "--config", str(unknown), "--print-config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 2 and "server.prot: unknown key" in out.stderr


def test_accelerate_configs_parse_and_the_cpu_one_launches_the_trainer(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO / "trainer" / "accelerate").glob("*.yaml"))
    kinds = {p.stem: load_config_from_file(str(p)) for p in configs}
    assert kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["multi_node_zero2"].num_machines == 2
    # The real launcher, with the CPU config, starts our entry point (it only prints the config).
    out = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
         str(REPO / "trainer/accelerate/single_cpu.yaml"), "-m", "trainer.train", "--preset", "tiny",
         "--set", "adversarial.discriminator=", "--set", "data.prompts=prompts.txt", "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["pretrained"] == "tiny"

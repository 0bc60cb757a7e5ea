"""docker-compose.yml, .env.example and the two images (no Docker engine here): the compose file
validates (`docker-compose config`, and a structural check of our own that always runs), every
variable is documented, the Dockerfiles are sound, and each service's exact command line runs as
a local process on the toy preset, in an environment built from its image's files."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from advgrpo.reward_server.config import PRESETS as SERVER_PRESETS
from advgrpo.trainer.config import PRESETS as TRAINER_PRESETS

from .docker_helpers import (
    DOCKERFILES,
    REPO,
    Dockerfile,
    Localizer,
    Service,
    build_context_files,
    compose_variables,
    docker_compose_config,
    env_example,
    free_port,
    git_files,
    load_compose,
    load_compose_raw,
    project_scripts,
)

DEFAULT = {"reward-server", "trainer"}
GPU = {"reward-server-gpu", "trainer-gpu"}
SERVERS = {"reward-server", "reward-server-gpu"}


def services(env: dict[str, str] | None = None) -> dict[str, Service]:
    compose = load_compose(env)
    return {name: Service.from_compose(compose, name) for name in compose["services"]}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def dev_localizer(root: Path, ports: dict | None = None) -> Localizer:
    return Localizer(root, ports or {}, scripts=project_scripts())


# ------------------------------------------------------------------ the compose file (pure Python)


def test_services_profiles_and_images():
    compose = load_compose()
    svc = compose["services"]
    assert set(svc) == DEFAULT | GPU
    assert {n for n, s in svc.items() if not s.get("profiles")} == DEFAULT  # what `docker compose up` starts
    assert {n for n, s in svc.items() if "gpu" in s.get("profiles", [])} == GPU
    for name, s in svc.items():
        assert s["build"]["context"] == "."
        assert (REPO / s["build"]["dockerfile"]).is_file(), name
        kind = "reward-server" if name in SERVERS else "trainer"
        assert Path(s["build"]["dockerfile"]) == DOCKERFILES[kind].relative_to(REPO), name
        assert s["image"].startswith(f"advgrpo/{kind}:")
    assert len({s["image"] for s in svc.values()}) == 4, "CPU and CUDA builds need their own tags"
    for name in GPU:
        assert svc[name]["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    # Trainers wait for their server's healthcheck, talk to it by its service name and gRPC port,
    # and share its IPC namespace (/dev/shm) where the server makes it shareable.
    for trainer, server in (("trainer", "reward-server"), ("trainer-gpu", "reward-server-gpu")):
        assert svc[trainer]["depends_on"] == {server: {"condition": "service_healthy"}}
        s = Service.from_compose(compose, trainer)
        grpc_port = flag(Service.from_compose(compose, server).argv, "--port")
        assert flag(s.argv, "--server") == f"{server}:{grpc_port}"
        assert svc[trainer]["ipc"] == f"service:{server}" and svc[server]["ipc"] == "shareable"
        assert svc[trainer]["environment"]["ADVGRPO_AUTH_TOKEN"] == svc[server]["environment"]["ADVGRPO_AUTH_TOKEN"]


def test_every_variable_is_documented_in_env_example_with_its_default():
    used = compose_variables()
    documented = env_example()
    assert set(used) == set(documented)
    for name, defaults in used.items():
        assert len(defaults) == 1, f"{name}: different defaults {defaults}"
        (default,) = defaults
        assert default is not None, f"{name}: used without a default"
        assert documented[name] == default, f".env.example {name}={documented[name]!r}, compose default {default!r}"
    # Each block of variables follows a comment that explains it.
    lines = (REPO / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            above = next(p for p in reversed(lines[:i]) if not (p and not p.startswith("#")))
            assert above.startswith("#"), f".env.example: {line!r} has no comment above it"
    # The documented values are the defaults: an .env copied from it changes nothing.
    assert load_compose(documented) == load_compose({})


def test_ports_volumes_and_healthchecks():
    compose = load_compose()
    svc = compose["services"]
    published = []
    for name in SERVERS:
        ports = [p.split(":") for p in svc[name]["ports"]]
        assert {(host, target) for host, _, target in ports} == {("127.0.0.1", "50051"), ("127.0.0.1", "8080")}
        published += [p for _, p, _ in ports]
    assert len(set(published)) == len(published), "both stacks can run at once"
    declared = set(compose["volumes"])
    for name in svc:
        s = Service.from_compose(compose, name)
        for source, target in s.mounts():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"
                # A named volume starts as a copy of the image's folder: the user must own it.
                assert any(target in run and "chown" in run for run in s.image.runs), f"{name}: {target}"
        if "HF_HOME" in s.environment:
            assert s.environment["HF_HOME"] in {t for _, t in s.mounts()}, f"{name}: HF cache not mounted"
        assert s.healthcheck, name
        if "healthcheck" in s.spec:  # compose may lengthen the start period, not change the check
            assert s.spec["healthcheck"]["test"] == s.image.healthcheck, name
    assert {t for _, t in Service.from_compose(compose, "trainer-gpu").mounts()} >= {"/outputs", "/hf-cache", "/data"}


def test_gpu_profile_reserves_nvidia_gpus_and_uses_the_real_presets():
    compose = load_compose()
    for name in GPU:
        (device,) = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["count"] == "all" or int(device["count"]) >= 1
    s = services()
    assert flag(s["reward-server-gpu"].argv, "--preset") == "sd3-adv" and "sd3-adv" in SERVER_PRESETS
    assert (
        flag(s["trainer-gpu"].argv, "--preset") == "dino_cotrain_sd3_patch_fast"
        and "dino_cotrain_sd3_patch_fast" in TRAINER_PRESETS
    )
    assert flag(s["reward-server"].argv, "--preset") == "toy"
    # The presets are variables: every value offered by the CLIs is reachable.
    custom = services(
        {"REWARD_GPU_PRESET": "tiny", "TRAINER_GPU_PRESET": "ocr_cotrain_sd3_fast", "TRAINER_GPU_COUNT": "2"}
    )
    assert flag(custom["reward-server-gpu"].argv, "--preset") == "tiny"
    assert flag(custom["trainer-gpu"].argv, "--output-dir") == "/outputs/ocr_cotrain_sd3_fast"
    assert custom["trainer-gpu"].spec["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "2"


# ------------------------------------------------------------------ docker-compose itself


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed (make sysdeps)")
@pytest.mark.parametrize("case", ["defaults", "env-example", "custom"])
def test_docker_compose_validates_the_file_and_reads_it_as_we_do(case, tmp_path):
    env = {
        "defaults": {},
        "env-example": env_example(),
        "custom": {"REWARD_PRESET": "sd3-adv", "DEMO_EPOCHS": "7", "ADVGRPO_AUTH_TOKEN": "s3cret", "GRPC_PORT": "6000",
                   "TRAINER_GPU_PRESET": "pickscore_cotrain_sd3_fast", "TRAINER_GPU_COUNT": "all", "HF_CACHE": "/srv/hf"},
    }[case]  # fmt: skip
    theirs = docker_compose_config(env, tmp_path)["services"]
    ours = load_compose(env)["services"]
    assert set(theirs) == set(ours)
    for name, s in ours.items():
        t = theirs[name]
        for key in ("image", "command", "entrypoint", "environment", "ipc", "depends_on", "profiles", "shm_size"):
            assert t.get(key) == s.get(key), (name, key)
        assert t.get("deploy") == s.get("deploy"), name
        assert t.get("healthcheck", {}).get("test") == s.get("healthcheck", {}).get("test"), name
        assert [p.removesuffix("/tcp") for p in t.get("ports", [])] == s.get("ports", []), name
        theirs_volumes = [tuple(v.split(":")[:2]) for v in t.get("volumes", [])]
        ours_volumes = [
            (str((REPO / src).resolve()) if src.startswith(".") else src, target)
            for src, target in (v.split(":")[:2] for v in s.get("volumes", []))
        ]
        assert theirs_volumes == ours_volumes, name
    if case == "custom":
        assert ours["trainer"]["command"][-1] == "7" and "/srv/hf" in ours["reward-server"]["volumes"][1]


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed (make sysdeps)")
def test_docker_compose_refuses_a_broken_file(tmp_path):
    """The validation above is real: the same file with one misspelt key does not pass."""
    raw = load_compose_raw()
    raw["services"]["trainer"]["depends_onn"] = raw["services"]["trainer"].pop("depends_on")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(subprocess.CalledProcessError) as err:
        docker_compose_config({}, tmp_path, broken)
    assert "depends_onn" in err.value.stderr


# ------------------------------------------------------------------ the Dockerfiles


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_copies_what_git_has_runs_as_a_user_and_checks_health(image):
    d = Dockerfile.parse(DOCKERFILES[image])
    for src in d.copy_sources:
        assert git_files([src]), f"COPY source {src} missing (or not in git)"
    assert d.user and d.user not in ("root", "0") and not d.user.startswith(("root:", "0:"))
    assert any(f"useradd --create-home --uid 1000 {d.user}" in run for run in d.runs), "uid 1000 in both images"
    assert d.healthcheck and d.healthcheck[0] in ("CMD", "CMD-SHELL")
    assert set(d.healthcheck_options) >= {"interval", "timeout", "start-period", "retries"}
    assert d.entrypoint


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_installs_its_units_pinned_by_the_lock(image):
    d = Dockerfile.parse(DOCKERFILES[image])
    units = d.installed_units()
    expected = {"reward-server": ["protos", "common", "client", "kernels", "reward_server"],
                "trainer": ["protos", "common", "client", "trainer"]}[image]  # fmt: skip
    assert units == expected
    copied = {Path(s).parts[0] for s in d.copy_sources}
    assert set(units) <= copied
    (install,) = [args for args in d.installs() if any(a.startswith("./") for a in args)]
    assert install[:4] == ["uv", "pip", "install", "--system"]
    assert flag(install, "-c") == flag(install, "--build-constraint") == "requirements/lock.txt"
    assert {"requirements/lock.txt", "requirements/bootstrap.txt"} <= set(d.copy_sources)
    # torch: from the machine's index (a build arg), before the locked install; uv from the
    # hash-pinned bootstrap file, as `make` installs it.
    bootstrap = [args for args in d.installs() if args[:2] == ["pip", "install"]]
    assert ["pip", "install", "--require-hashes", "--no-deps", "-r", "requirements/bootstrap.txt"] in bootstrap
    assert ["pip", "install", "--index-url", "${TORCH_INDEX}", "${TORCH_SPEC}"] in bootstrap


def test_the_build_context_is_what_git_has():
    """.dockerignore keeps out everything git ignores under the copied folders (generated gRPC
    modules, build/ and egg-info from local installs, caches), and nothing git has."""
    sources = sorted({s for path in DOCKERFILES.values() for s in Dockerfile.parse(path).copy_sources})
    assert build_context_files(sources) == git_files(sources)


def test_the_trainer_images_command_parses():
    d = Dockerfile.parse(DOCKERFILES["trainer"])
    assert d.entrypoint == ["advgrpo-train"] and "advgrpo-train" in project_scripts()
    out = subprocess.run(
        [*dev_localizer(Path("/nonexistent")).executable(d.entrypoint[0]), *d.cmd],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0 and "--preset" in out.stdout, out.stderr


@pytest.mark.parametrize("name", sorted(DEFAULT | GPU))
def test_every_services_command_parses_with_our_clis(name, tmp_path):
    s = services()[name]
    loc = dev_localizer(tmp_path)
    argv = loc.argv(s.argv, s)
    run = dict(capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, **loc.environment(s)})
    if name in SERVERS:
        out = subprocess.run([*argv, "--print-config"], **run)
        assert out.returncode == 0, out.stderr
        server = yaml.safe_load(out.stdout)["server"]
        assert server["host"] == "127.0.0.1" and server["port"] == 50051 and server["http_port"] == 8080
    elif name == "trainer":
        assert s.argv[:3] == ["python", "-m", "advgrpo.trainer.demo"]
        code = "import sys; from advgrpo.trainer.demo import parser; print(vars(parser().parse_args(sys.argv[1:])))"
        out = subprocess.run([sys.executable, "-c", code, *s.argv[3:]], **run)
        assert out.returncode == 0, out.stderr
        assert "'server': 'reward-server:50051'" in out.stdout and "'epochs': 4" in out.stdout
    else:
        from accelerate.commands.launch import launch_command_parser

        i = s.argv.index("-m")
        launch = launch_command_parser().parse_args(s.argv[2 : i + 2])
        assert s.argv[:2] == ["accelerate", "launch"] and launch.module and launch.num_processes == 1
        config = Path(launch.config_file)
        assert (
            config.parent == Path("/app/trainer/accelerate-configs")
            and (REPO / "trainer/accelerate-configs" / config.name).is_file()
        )
        train = loc.argv(["python", "-m", s.argv[i + 1], *s.argv[i + 2 :], "--print-config"], s)
        out = subprocess.run(train, **run)
        assert out.returncode == 0, out.stderr
        cfg = yaml.safe_load(out.stdout)
        assert cfg["model"]["pretrained"] == "stabilityai/stable-diffusion-3.5-medium"
        assert cfg["reward"]["server"] == "reward-server-gpu:50051"
        assert cfg["run"]["output_dir"] == str(tmp_path / "volumes/trainer-outputs/dino_cotrain_sd3_patch_fast")


# ------------------------------------------------------------------ the stack as local processes


class Heartbeats:
    """Runs a service's healthcheck command, as Docker would, and keeps what it answered."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env, self.answers = argv, env, []

    def probe(self) -> tuple[int, str]:
        out = subprocess.run(self.argv, capture_output=True, text=True, timeout=30, env=self.env)
        self.answers.append((out.returncode, (out.stdout + out.stderr).strip()))
        return self.answers[-1]


def _read_ready_line(proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no ready line (exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_each_services_command_runs_as_a_local_process(profile, image_env, tmp_path):
    """The services of a profile, as their containers would run them (exact command line from the
    parsed compose file and Dockerfile, image ENV + compose environment), each in an environment
    holding its image's wheels: the server starts and its healthcheck passes (and fails once it
    is stopped), the trainer's command runs its epochs against it to completion while its
    healthcheck passes, then fails (the trainer finished)."""
    token = secrets.token_hex(8)
    env = {"ADVGRPO_AUTH_TOKEN": token}
    if profile == "gpu":  # the GPU services' own command lines, on the tiny presets (and no GPU)
        env |= {"REWARD_GPU_PRESET": "tiny", "TRAINER_GPU_PRESET": "tiny"}
    svc = services(env)
    server_name, trainer_name = ("reward-server", "trainer") if profile == "default" else sorted(GPU)
    server, trainer = svc[server_name], svc[trainer_name]
    server_env, trainer_env = image_env("reward-server"), image_env("trainer")
    ports = {server_name: {50051: free_port(), 8080: free_port()}}
    loc_server = Localizer(tmp_path, ports, server_env.python, server_env.console_scripts())
    loc_trainer = Localizer(tmp_path, ports, trainer_env.python, trainer_env.console_scripts())
    for local in [*loc_server.paths(server).values(), *loc_trainer.paths(trainer).values()]:
        if not str(local).startswith(str(REPO)):
            local.mkdir(parents=True, exist_ok=True)  # what Docker creates: volumes, binds, /tmp
    if profile == "gpu":  # the ./data the GPU trainer reads its references from
        from advgrpo.trainer.references import write_synthetic_references

        refs = Path(loc_trainer.text(flag(trainer.argv, "--set").split("=", 1)[1], trainer))
        assert refs.parent == loc_trainer.paths(trainer)["/data"]
        write_synthetic_references(refs.parent, ["a red apple", "a blue car"], per_prompt=3)

    server_argv = loc_server.argv(server.argv, server)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        server_argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path,
        env=server_env.env(loc_server.environment(server)),
    )  # fmt: skip
    server_health = Heartbeats(loc_server.healthcheck(server), server_env.env())
    try:
        try:
            ready = _read_ready_line(proc, 240)
        except AssertionError:
            log.flush()
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
        assert ready["grpc_port"] == ports[server_name][50051]
        models = (
            {"dino", "saturation", "dino_similarity"}
            if profile == "default"
            else {"dino", "pickscore", "ocr", "dino_similarity"}
        )
        assert {m["name"] for m in ready["models"]} == models
        for _ in range(40):
            if server_health.probe()[0] == 0:
                break
            time.sleep(0.5)
        assert server_health.answers[-1][0] == 0, server_health.answers
        assert '"ready"' in server_health.answers[-1][1]
        # The compose file's token reached the server: its API refuses a caller without it.
        http = f"http://127.0.0.1:{ports[server_name][8080]}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{http}/v1/models", timeout=10)
        assert refused.value.code == 401

        # The trainer's command, against that server, its healthcheck probed while it runs.
        trainer_argv = loc_trainer.argv(trainer.argv, trainer)
        trainer_environment = loc_trainer.environment(trainer)
        assert Path(trainer_environment["ADVGRPO_HEARTBEAT_FILE"]).is_relative_to(tmp_path)
        trainer_health = Heartbeats(loc_trainer.healthcheck(trainer), trainer_env.env(trainer_environment))
        assert trainer_health.probe()[0] == 1 and "no heartbeat" in trainer_health.answers[-1][1]
        out_path = tmp_path / "trainer.out"
        with out_path.open("w") as out:
            t0 = time.monotonic()
            run = subprocess.Popen(
                trainer_argv, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                env=trainer_env.env(trainer_environment),
            )  # fmt: skip
            while run.poll() is None and time.monotonic() - t0 < 400:
                trainer_health.probe()
                time.sleep(0.5)
            if run.poll() is None:
                run.kill()
            code = run.wait(30)
        assert code == 0, out_path.read_text()[-4000:]
        healthy = [msg for rc, msg in trainer_health.answers if rc == 0]
        assert healthy and all("trainer running" in m for m in healthy), trainer_health.answers
        rc, msg = trainer_health.probe()
        assert rc == 1 and "trainer finished" in msg, msg
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        finally:
            log.close()
    assert server_health.probe()[0] != 0, "the server's healthcheck passes with no server"

    # What the trainer wrote, where its mounts put it.
    out_dir = Path(loc_trainer.text(flag(trainer.argv, "--output-dir"), trainer))
    assert out_dir.is_relative_to(tmp_path / "volumes/trainer-outputs")
    run_dir = out_dir / "run" if profile == "default" else out_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"] for r in records if "reward_mean" in r}
    expected = int(flag(trainer.argv, "--epochs")) if profile == "default" else TRAINER_PRESETS["tiny"]["run"]["epochs"]
    assert epochs == set(range(expected))
    assert any("d_version" in r for r in records) and any("train_loss" in r for r in records)
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run_dir / "samples").glob("*.png"))
    # The token came from the environment and stays there: no output of the run records it.
    leaked = [p for p in out_dir.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert leaked == [], leaked
    # The server's state went to its /state volume (the discriminator it trained).
    state = loc_server.paths(server)["/state"]
    assert any(state.rglob("*")), "nothing in the server's /state"

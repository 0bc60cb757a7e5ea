"""Each install unit in a bare virtualenv of its own, built from the files git has: the client
scores against a real server with only grpcio, protobuf, numpy and pillow; the server serves the
tiny preset without the trainer's packages; the trainer runs a tiny epoch against a real server
without the server's. And our import names never shadow another distribution's: with Hugging
Face's ``kernels`` and Coqui's ``trainer`` on the path, from the repository root, ``import kernels``
and ``import trainer`` are theirs while ours still import and run."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from advgrpo.client import Group, RewardClient
from advgrpo.common.process import ServerProcess

from .conftest import REPO
from .docker_helpers import build_unit_wheels
from .trainer_helpers import make_reference_set

pytestmark = pytest.mark.slow

UV = str(Path(sys.executable).with_name("uv"))
UNITS = ["protos", "common", "client", "kernels", "reward_server", "trainer"]
# What `pip list` may show beside our own distributions in the client's environment.
CLIENT_DEPS = {"grpcio", "protobuf", "numpy", "pillow", "typing-extensions"}
SERVER_ONLY = {"blake3", "grpcio-reflection", "grpcio-health-checking", "rapidocr-onnxruntime", "starlette", "uvicorn"}
TRAINER_ONLY = {"diffusers", "peft", "accelerate"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """One wheel per unit, built from a copy of the files git tracks (nothing generated in the
    checkout, such as the gRPC modules, can leak into them)."""
    tracked = subprocess.run(["git", "ls-files", "-z", *UNITS], cwd=REPO, capture_output=True, check=True)
    files = [f for f in tracked.stdout.decode().split("\0") if f]
    return build_unit_wheels(files, UNITS, tmp_path_factory.mktemp("units"))


def bare_env(root: Path, wheels: dict[str, Path], units: list[str], *, torch: bool) -> Path:
    """A virtualenv with just ``units`` (and what their metadata requires, at the locked versions);
    torch, where needed, the machine's own build, as `make` installs it. Returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    if torch:
        links = runpy.run_path(str(REPO / "scripts" / "lock.py"))["find_links"]()
        if links:  # uv links the wheel from its cache: seconds, where pip unpacks 190 MB
            cmd = [UV, "pip", "install", "-q", "--python", str(python), "--no-index", "--find-links", links]
        else:  # pip's own configuration knows where this machine's torch is
            cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
        subprocess.run(
            [*cmd, "--no-deps", "-c", str(REPO / "constraints.txt"), "torch==2.13.0"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    subprocess.run(
        [UV, "pip", "install", "-q", "--python", str(python), "-c", str(REPO / "requirements" / "lock.txt"),
         *(str(wheels[u]) for u in units)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return root / "bin"


def installed(bin_dir: Path) -> set[str]:
    out = subprocess.run(
        [UV, "pip", "list", "--python", str(bin_dir / "python"), "--format", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return {d["name"].lower() for d in json.loads(out.stdout)}


def images(seed: int, n: int = 4, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_the_client_alone_scores_against_a_real_server(tmp_path, wheels):
    bin_dir = bare_env(tmp_path / "env", wheels, ["protos", "common", "client"], torch=False)
    ours = {"advgrpo-protos", "advgrpo-common", "advgrpo-client"}
    assert installed(bin_dir) - ours <= CLIENT_DEPS, installed(bin_dir)
    with ServerProcess(["--preset", "tiny"], http=False) as server:
        np.save(tmp_path / "images.npy", np.stack(images(1)))
        script = textwrap.dedent(f"""
            import json, sys
            import numpy as np
            from advgrpo.client import Group, RewardClient
            for name in ("torch", "yaml", "grpc_health", "advgrpo.reward_server"):
                assert name not in sys.modules, name
            with RewardClient({server.target!r}, timeout_s=60) as c:
                c.wait_ready(timeout_s=60)
                assert c.health() == "SERVING"
                [s] = c.score([Group('a sign that says "hi"', list(np.load({str(tmp_path / "images.npy")!r})))])
            print(json.dumps({{"rewards": [float(r) for r in s.rewards], "where": __import__("advgrpo.client").client.__file__}}))
        """)  # fmt: skip
        out = subprocess.run([str(bin_dir / "python"), "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert Path(got["where"]).is_relative_to(tmp_path / "env"), got["where"]
        with RewardClient(server.target) as here:
            [want] = here.score([Group('a sign that says "hi"', images(1))])
        assert got["rewards"] == [float(r) for r in want.rewards]


def test_the_server_alone_serves_the_tiny_preset(tmp_path, wheels):
    bin_dir = bare_env(tmp_path / "env", wheels, ["protos", "common", "client", "kernels", "reward_server"], torch=True)
    names = installed(bin_dir)
    assert "advgrpo-reward-server" in names and not names & (TRAINER_ONLY | {"advgrpo-trainer"}), names
    with ServerProcess(["--preset", "tiny"], command=[str(bin_dir / "advgrpo-reward-server")]) as server:
        assert {m["name"] for m in server.info["models"]} == {"dino", "pickscore", "ocr", "dino_similarity"}
        with RewardClient(server.target) as c:
            [s] = c.score([Group('a sign that says "hi"', images(2))], {"dino": 1.0, "ocr": 0.5, "pickscore": 1.0})
            assert len(s.rewards) == 4 and np.isfinite(s.rewards).all()
            upd = c.update_discriminator("dino", references=[Group("x", images(3))], generated=[Group("x", images(4))])
            assert upd.version == 1


def test_the_trainer_alone_runs_a_toy_epoch_against_a_real_server(tmp_path, wheels):
    bin_dir = bare_env(tmp_path / "env", wheels, ["protos", "common", "client", "trainer"], torch=True)
    names = installed(bin_dir)
    assert "advgrpo-trainer" in names and not names & (SERVER_ONLY | {"advgrpo-reward-server", "advgrpo-kernels"})
    references = make_reference_set(tmp_path / "refs")
    with ServerProcess(["--preset", "tiny"], http=False) as server:
        out = subprocess.run(
            # The toy preset: the pretrained toy model ships inside the trainer's wheel.
            [str(bin_dir / "advgrpo-train"), "--preset", "toy", "--server", server.target,
             "--set", f"adversarial.references={references}", "--set", "run.epochs=1",
             "--output-dir", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch0 = next(m for m in metrics if m.get("epoch") == 0 and "reward_mean" in m)
    assert np.isfinite(epoch0["reward_mean"]) and epoch0["reward_versions"]["dino"] >= 0
    assert "Traceback" not in out.stderr
    # The demo starts a server of its own: without one installed it says what to do instead.
    demo = subprocess.run(
        [str(bin_dir / "python"), "-m", "advgrpo.trainer.demo", "--epochs", "1", "--output-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert demo.returncode == 2 and "--server HOST:PORT" in demo.stderr, demo.stderr[-2000:]


def test_our_source_roots_offer_no_top_level_name_but_advgrpo():
    """An editable install puts each unit's folder on sys.path: anything importable there besides
    advgrpo/ (a module, a package, or a plain folder, which Python takes as a namespace package)
    would be a top-level name of ours. Only protos/ holds setup.py, its build hook."""
    for unit in UNITS:
        names = {
            p.stem if p.suffix == ".py" else p.name
            for p in (REPO / unit).iterdir()
            if (p.is_dir() or p.suffix == ".py") and (p.stem if p.suffix == ".py" else p.name).isidentifier()
        }
        names -= {"__pycache__", "build", "dist"}
        assert names == ({"advgrpo", "setup"} if unit == "protos" else {"advgrpo"}), (unit, names)


def test_our_import_names_shadow_nobody(tmp_path):
    """From the repository root (as the README starts everything), with Hugging Face's kernels
    (a dependency of transformers >= 5.25) and Coqui's trainer installed: theirs are what
    ``import kernels`` / ``import trainer`` find, and ours still import and run."""
    coqui = tmp_path / "coqui"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(coqui), "trainer==0.0.36"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(coqui)}
    script = textwrap.dedent("""
        import importlib.util, json
        import kernels
        from kernels import get_kernel  # Hugging Face's API
        import torch
        from advgrpo.kernels import patch_score
        from advgrpo.reward_server.models.dino import build_head
        import advgrpo.trainer.pipeline, advgrpo.client
        head = build_head(16, 8, seed=0)
        tokens, index = torch.randn(2, 5, 16), torch.tensor([[0, 1], [2, 3]])
        w = [p.detach() for p in (head[0].weight, head[0].bias, head[2].weight, head[2].bias)]
        cls, patch, reward = patch_score(tokens, index, *w)
        print(json.dumps({"kernels": kernels.__file__, "trainer": importlib.util.find_spec("trainer").origin,
                          "reward": reward.tolist()}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert "site-packages" in got["kernels"] and not Path(got["kernels"]).is_relative_to(REPO / "kernels")
    assert Path(got["trainer"]).is_relative_to(coqui), got["trainer"]
    assert len(got["reward"]) == 2 and all(np.isfinite(got["reward"]))
    # The documented commands, from the repository root, with both on the path.
    train = subprocess.run(
        [sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--set", "adversarial.discriminator=",
         "--set", "data.prompts=prompts.txt", "--print-config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    with ServerProcess(["--preset", "tiny"], http=False, env=env) as server:
        with RewardClient(server.target) as c:
            [s] = c.score([Group("a cat", images(5))])
        assert np.isfinite(s.rewards).all()

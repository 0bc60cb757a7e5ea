"""Compiles requirements/all.in (every unit and the dev tools) into a hash-pinned lock.

    python scripts/lock.py                      # make lock: refresh requirements/lock.txt
    python scripts/lock.py --upgrade -o FILE    # make test-latest: the newest the ranges allow

Pinned for CPython 3.11 on x86_64 Linux (manylinux_2_28), the machines and images we run on.
torch and our own units are left out of the output: torch is each machine's own build (a local
CPU wheel here, a CUDA build in a GPU image), installed apart from the lock; its dependencies
stay in. To resolve torch's dependencies as the CPU build declares them, uv must see the folder
holding that wheel: uv does not read pip's configuration, so the folder is taken from
UV_FIND_LINKS, PIP_FIND_LINKS or pip's own configuration, never from a path written here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = [
    "advgrpo-protos",
    "advgrpo-common",
    "advgrpo-client",
    "advgrpo-kernels",
    "advgrpo-reward-server",
    "advgrpo-trainer",
]


def find_links() -> str:
    for var in ("UV_FIND_LINKS", "PIP_FIND_LINKS"):
        if os.environ.get(var):
            return os.environ[var]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def uv() -> str:
    found = Path(sys.executable).with_name("uv")
    return str(found) if found.exists() else (shutil.which("uv") or sys.exit("lock: uv not found (make venv)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upgrade", action="store_true", help="newest versions instead of keeping the current pins")
    ap.add_argument("-o", "--output", type=Path, default=REPO / "requirements" / "lock.txt")
    args = ap.parse_args()
    env = dict(os.environ)
    links = find_links()
    if links:
        env["UV_FIND_LINKS"] = links
    cmd = [
        uv(), "pip", "compile", "-q", "requirements/all.in", "-c", "constraints.txt", "--generate-hashes",
        "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
        "--custom-compile-command", "make lock", "--no-emit-package", "torch",
        *(f"--no-emit-package={name}" for name in OURS),
        "-o", str(args.output.resolve()),
    ]  # fmt: skip
    if args.upgrade:
        cmd.append("--upgrade")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    text = args.output.read_text()
    # A CUDA build of torch drags in nvidia-* packages: the lock must describe the CPU build.
    cuda = sorted(set(re.findall(r"(?m)^(nvidia-[\w-]+)==", text)))
    if cuda:
        args.output.unlink()
        sys.exit(
            f"lock: torch resolved to a CUDA build ({', '.join(cuda)}); set UV_FIND_LINKS to the folder "
            "that holds this machine's CPU wheel of torch"
        )
    print(f"lock: {len(re.findall(r'(?m)^[A-Za-z0-9][^ ]*==', text))} packages pinned in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

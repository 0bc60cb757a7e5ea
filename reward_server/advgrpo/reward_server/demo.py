"""The reward server alone (``python -m advgrpo.reward_server.demo``): start it on the tiny preset, score a
group with every model, teach the discriminator references from generations, and stop."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from advgrpo.client import Group, RewardClient
from advgrpo.common.process import ServerProcess


def text_image(text: str, size: int = 256) -> np.ndarray:
    img = Image.new("RGB", (size * 2, size), "white")
    ImageDraw.Draw(img).text((20, size // 3), text, fill="black", font=ImageFont.load_default(size=48))
    return np.asarray(img)


def gradient(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return (np.clip(a * (1 - x[..., None]) + b * y[..., None], 0, 1) * 255).astype(np.uint8)


def noise(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def main() -> int:
    out_dir = Path(os.environ.get("DEMO_OUTPUT", "demo-output")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "server.log"
    state_dir = out_dir / "state"
    shutil.rmtree(state_dir, ignore_errors=True)  # every demo starts the discriminator from version 0
    print("starting: python -m advgrpo.reward_server --preset tiny")
    try:
        server = ServerProcess(["--preset", "tiny", "--state-dir", str(state_dir)], log_file=log_path)
    except RuntimeError:
        print(f"server failed to start; see {log_path}", file=sys.stderr)
        return 1
    with server:
        print(f"reward server ready: gRPC {server.target}, dashboard {server.http}/dashboard")
        run_demo(server.target, out_dir)
    print(f"server stopped; log in {log_path}, discriminator state in {out_dir / 'state'}")
    return 0


def run_demo(target: str, out_dir: Path) -> None:
    rng = np.random.default_rng(0)
    with RewardClient(target) as client:
        client.wait_ready(60)
        for m in client.list_models():
            print(f"  model {m.name:15s} kind={m.kind:15s} trainable={m.trainable!s:5s} version={m.version}")
        prompt = 'a sign that says "hello"'
        group = Group(prompt, [text_image("hello"), text_image("world"), gradient(rng)], "demo")
        t0 = time.perf_counter()
        scores = client.score([group], {"dino": 1.0, "pickscore": 0.5, "ocr": 1.0})[0]
        print(f"scored {len(group.images)} images for {prompt!r} in {time.perf_counter() - t0:.2f}s")
        for i, r in enumerate(scores.rewards):
            parts = ", ".join(f"{k}={v[i]:+.3f}" for k, v in scores.components.items())
            print(f"  image {i}: reward {r:+.3f} ({parts})")
        refs = [Group("a", [gradient(rng) for _ in range(8)])]
        gens = [Group("a", [noise(rng) for _ in range(8)])]
        for _ in range(5):
            u = client.update_discriminator("dino", refs, gens, steps=10)
            print(
                f"  dino update -> version {u.version}: loss {u.loss:.3f}, reference {u.reference_score:+.3f}, "
                f"generated {u.generated_score:+.3f}, accuracy {u.accuracy:.2f}"
            )
        held = client.score(
            [Group("a", [gradient(rng) for _ in range(4)]), Group("a", [noise(rng) for _ in range(4)])], {"dino": 1.0}
        )
        print(
            f"held-out: references {np.mean(held[0].rewards):+.3f} vs generations {np.mean(held[1].rewards):+.3f} "
            f"(dino version {held[0].model_versions['dino']})"
        )
        (out_dir / "scores.json").write_text(
            json.dumps({"group": scores.__dict__, "last_update": u.__dict__}, indent=2)
        )
        print(f"results written to {out_dir / 'scores.json'}")


if __name__ == "__main__":
    sys.exit(main())

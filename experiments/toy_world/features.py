"""The feature network of the toy world's distances: ``python -m experiments.toy_world.features --output DIR``.

The experiments measure how far samples drift from held-out references with a kernel distance on
features of a fixed network that neither reward uses (the proxy is a pixel statistic, the
discriminator sits on the toy DINOv2). Like the Inception network of FID, this one is a classifier
of its domain: a small CNN trained, supervised, to tell a rendered scene's style, colour and shape
and to regress its centre and size, from the render's own parameters (not from the caption
checker's readings). Its 64-d pooled features (before the heads) are the features.

Trained once; the weights ship beside this file (``feature_net/``) with ``training.json``: the
command, the held-out accuracy of each head and the sha256 of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from advgrpo.common import toy_domain as td

FEATURE_NET_DIR = Path(__file__).parent / "feature_net"
WEIGHTS = "model.safetensors"
IMAGE_SIZE = 32
FEATURE_DIM = 64


class FeatureNet(nn.Module):
    """Conv 32 px -> 64-d features (global average pool), plus the training heads."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, 32), block(32, 32), nn.AvgPool2d(2),  # 16
            block(32, 64), block(64, 64), nn.AvgPool2d(2),  # 8
            block(64, FEATURE_DIM), block(FEATURE_DIM, FEATURE_DIM),
        )  # fmt: skip
        self.style = nn.Linear(FEATURE_DIM, len(td.STYLES))
        self.colour = nn.Linear(FEATURE_DIM, len(td.COLOURS))
        self.shape = nn.Linear(FEATURE_DIM, len(td.SHAPES))
        self.geometry = nn.Linear(FEATURE_DIM, 3)  # cx, cy, radius (fractions of the side)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] in [0, 1] -> [B, 64]."""
        return self.body(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {"style": self.style(f), "colour": self.colour(f), "shape": self.shape(f), "geometry": self.geometry(f)}


def to_tensor(images) -> torch.Tensor:
    """uint8 [H, W, 3] images (any size; resized to 32 px) -> float [B, 3, 32, 32] in [0, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_feature_net(directory: Path = FEATURE_NET_DIR) -> FeatureNet:
    net = FeatureNet()
    net.load_state_dict(load_file(str(directory / WEIGHTS)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features(net: FeatureNet, images, chunk: int = 256) -> np.ndarray:
    """float64 [N, 64] features of uint8 images."""
    out = [net.features(to_tensor(images[i : i + chunk])) for i in range(0, len(images), chunk)]
    return torch.cat(out).double().numpy()


def labelled_scenes(n: int, seed: int):
    """``n`` rendered scenes, both styles in turn, with their render parameters as targets."""
    rng = random.Random(seed)
    images, targets = [], []
    colours, styles = list(td.COLOURS), list(td.STYLES)
    for i in range(n):
        scene = td.random_scene(rng, IMAGE_SIZE)
        style = styles[i % 2]
        images.append(td.render(scene, IMAGE_SIZE, style))
        targets.append(
            (styles.index(style), colours.index(scene.colour), td.SHAPES.index(scene.shape),
             scene.cx / IMAGE_SIZE, scene.cy / IMAGE_SIZE, scene.radius / IMAGE_SIZE)
        )  # fmt: skip
    t = np.array(targets)
    return to_tensor(images), torch.from_numpy(t[:, :3].astype(np.int64)), torch.from_numpy(t[:, 3:]).float()


def loss_and_accuracy(net, x, labels, geometry):
    out = net(x)
    loss = F.mse_loss(out["geometry"], geometry) * 10
    acc = {}
    for i, head in enumerate(("style", "colour", "shape")):
        loss = loss + F.cross_entropy(out[head], labels[:, i])
        acc[head] = float((out[head].argmax(1) == labels[:, i]).float().mean())
    return loss, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.toy_world.features", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help=f"the shipped copy is {FEATURE_NET_DIR}")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--images", type=int, default=12_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    x, labels, geometry = labelled_scenes(args.images, args.seed)
    # Noise as augmentation: the features must stay meaningful on a generator's images.
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        xb = x[idx]
        noise = torch.rand(args.batch, 1, 1, 1, generator=g) * 0.08
        xb = (xb + noise * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        loss, acc = loss_and_accuracy(net, xb, labels[idx], geometry[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} {acc}", file=sys.stderr)
    net.eval()
    xt, lt, gt = labelled_scenes(1200, args.seed + 1)
    with torch.no_grad():
        _, held_out = loss_and_accuracy(net, xt, lt, gt)
    args.output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.output / WEIGHTS))
    record = {
        "command": "python -m experiments.toy_world.features " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "cpu_minutes": (time.perf_counter() - t0) / 60,
        "trained_on": f"{args.images} rendered scenes, day and night in turn, {IMAGE_SIZE} px; targets: style, "
        "colour, shape (classes) and centre and size (regression), from the render's parameters",
        "held_out_accuracy": held_out,
        "sha256": {WEIGHTS: hashlib.sha256((args.output / WEIGHTS).read_bytes()).hexdigest()},
    }
    (args.output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}: held-out accuracy {held_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

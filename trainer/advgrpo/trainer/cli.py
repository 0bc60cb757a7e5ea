"""``advgrpo-train`` and ``advgrpo-generate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from advgrpo.common.errors import ConfigError
from advgrpo.trainer import healthcheck
from advgrpo.trainer.config import (
    PRESET_ALIASES,
    PRESETS,
    dump_train_config,
    load_train_config,
    preset_names,
    without_secrets,
)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advgrpo-train", description="Adv-GRPO on Stable Diffusion 3 against a reward server."
    )
    p.add_argument("--config", type=Path, help="YAML config (merged over --preset)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--preset",
        choices=preset_names(),
        metavar="PRESET",
        help=f"{', '.join(PRESETS)} (docs/METHOD.md); older names: "
        + ", ".join(f"{old} = {new}" for old, new in PRESET_ALIASES.items()),
    )
    p.add_argument("--server", help="reward server HOST:PORT (reward.server)")
    p.add_argument("--output-dir", type=Path, help="run directory: metrics.jsonl, checkpoints/, samples/")
    p.add_argument("--epochs", type=int, help="total epochs (run.epochs)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in --output-dir, or from the given checkpoint folder",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the merged config and exit (no references or prompts needed: those are checked when training starts)",
    )
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    overrides: dict = {}
    if args.server:
        overrides.setdefault("reward", {})["server"] = args.server
    if args.output_dir:
        overrides.setdefault("run", {})["output_dir"] = str(args.output_dir)
    if args.epochs is not None:
        overrides.setdefault("run", {})["epochs"] = args.epochs
    if args.preset is None and args.config is None:
        print("advgrpo-train: give --preset and/or --config", file=sys.stderr)
        return 2
    try:
        # $ADVGRPO_HEARTBEAT_FILE: what the image's HEALTHCHECK reads
        with healthcheck.reporting(enabled=not args.print_config) as run:
            try:
                cfg = load_train_config(args.preset, args.config, args.sets, overrides)
                if args.print_config:
                    yaml.safe_dump(without_secrets(dump_train_config(cfg)), sys.stdout, sort_keys=False)
                    return 0
                from advgrpo.trainer.loop import AdvGrpoTrainer  # heavy imports after the config is known to be good
                from advgrpo.trainer.rewards import RewardsFailed

                try:
                    AdvGrpoTrainer(cfg, resume=args.resume).run()
                except RewardsFailed as exc:  # the checkpoints so far stand; --resume continues
                    run.fail(str(exc))
                    print(f"advgrpo-train: {exc}", file=sys.stderr)
                    return 3
            except ConfigError as exc:
                run.fail(str(exc))
                print(f"advgrpo-train: {exc}", file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        return 130
    print(
        f"run finished: metrics in {cfg.run.output_dir / 'metrics.jsonl'}, checkpoints in "
        f"{cfg.run.output_dir / 'checkpoints'}, samples in {cfg.run.output_dir / 'samples'}"
    )
    return 0


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advgrpo-generate", description="Generate PNGs with a trained Adv-GRPO LoRA.")
    p.add_argument("--lora", type=Path, required=True, help="a checkpoint's lora/ folder (or the checkpoint folder)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--output", type=Path, default=Path("generated"), help="folder for the PNGs")
    p.add_argument("--model", help="base model id/path (default: the one the LoRA was trained on)")
    p.add_argument("--seed", type=int, help="first seed (default: the trainer's eval seed)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the trainer's eval steps)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the trainer's)")
    p.add_argument("--device", default="cpu")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    lora = args.lora / "lora" if (args.lora / "lora").is_dir() else args.lora
    settings_file = lora / "advgrpo.json"
    if not lora.is_dir():
        print(f"advgrpo-generate: --lora {args.lora}: no such folder", file=sys.stderr)
        return 2
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    if args.model:
        settings["pretrained"] = args.model
    if "pretrained" not in settings:
        print(f"advgrpo-generate: {settings_file} missing: give --model", file=sys.stderr)
        return 2
    for key, value in (("num_steps", args.steps), ("guidance_scale", args.guidance), ("seed", args.seed)):
        if value is not None:
            settings[key] = value
    settings.setdefault("num_steps", 28)
    settings.setdefault("guidance_scale", 4.5)
    settings.setdefault("resolution", 512)
    settings.setdefault("max_sequence_length", 128)
    settings.setdefault("seed", 0)
    import torch

    from advgrpo.trainer.logs import save_grid
    from advgrpo.trainer.loop import generate_images

    from . import pipeline as sd3

    try:
        pipe = sd3.load_sd3_pipeline(
            settings["pretrained"],
            dtype=settings.get("dtype", "float32"),
            device=args.device,
            seed=settings.get("model_seed", 0),
        )
        sd3.load_lora(pipe, lora)
        # Checkpoints written before model.vae_dtype decoded in the model's dtype.
        vae_dtype = getattr(torch, settings.get("vae_dtype", settings.get("dtype", "float32")))
        if pipe.vae.dtype != vae_dtype:
            pipe.vae.to(dtype=vae_dtype)
    except ConfigError as exc:
        print(f"advgrpo-generate: {exc}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = generate_images(pipe, prompts, settings, seed=settings["seed"], progress=True)
    from PIL import Image

    for i, img in enumerate(images):
        path = args.output / f"{i:04d}.png"
        Image.fromarray(img).save(path)
        print(path)
    save_grid(images, args.output / "grid.png")
    return 0


def main_train() -> None:
    sys.exit(train_main())


def main_generate() -> None:
    sys.exit(generate_main())

"""The trainer's demo: Adv-GRPO on the toy world against a reward server, in a minute on a CPU.

Starts the reward server (its toy preset: the toy DINOv2 discriminator, no downloads), writes a
reference set of the toy domain (rendered scenes of its 12 captions, in the mixture of styles the
toy model was trained on), runs Adv-GRPO epochs of
the shipped toy SD3 (the trainer's toy preset: the DINO discriminator trains every other epoch, the
generator in between), writes metrics, sample grids and a checkpoint, stops the server and says
where everything is. (``make demo`` runs the toy world's experiments instead: experiments/toy_world.)

``--server HOST:PORT`` runs the same epochs against a reward server that is already running
(the compose stack's trainer service: ``python -m advgrpo.trainer.demo --server reward-server:50051``);
it must serve a trainable ``dino`` (the server's toy and tiny presets do). The token is
``$ADVGRPO_AUTH_TOKEN``, as for the server.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m advgrpo.trainer.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--server", help="reward server HOST:PORT to train against (default: start a toy one, stopped at the end)"
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path(os.environ.get("DEMO_OUTPUT", "demo-output")),
        help="emptied, then references/, run/ (default $DEMO_OUTPUT or demo-output)",
    )
    p.add_argument(
        "--epochs", type=int, default=int(os.environ.get("DEMO_EPOCHS", "12")), help="default $DEMO_EPOCHS or 12"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from advgrpo.trainer import healthcheck

    try:
        with healthcheck.reporting() as run:
            code = _run(args)
            if code != 0:
                run.fail()
            return code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    out = args.output_dir.resolve()
    epochs = args.epochs
    # Emptied rather than removed: it may be a mount point (the compose stack's outputs volume).
    if out.is_dir():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    from advgrpo.common.toy_domain import PRETRAINING_NIGHT_SHARE
    from advgrpo.trainer.references import write_toy_references

    # References from the data: the toy model's own pretraining mixture of the two styles.
    refs = write_toy_references(out / "references", per_caption=8, night_share=PRETRAINING_NIGHT_SHARE)
    print(f"reference set: {refs}")
    server_log = out / "reward-server.log"
    t0 = time.perf_counter()
    from advgrpo.common.process import ServerProcess

    if args.server:
        server = contextlib.nullcontext()
        target = args.server
        print(f"reward server: gRPC {target} (already running)")
    else:
        if importlib.util.find_spec("advgrpo.reward_server") is None:
            print(
                "the demo starts its own reward server, which this environment does not have (the trainer "
                "installs without it): install advgrpo-reward-server beside it, or pass --server HOST:PORT",
                file=sys.stderr,
            )
            return 2
        try:
            server = ServerProcess(["--preset", "toy", "--state-dir", str(out / "reward-state")], log_file=server_log)
        except RuntimeError:
            print(f"reward server failed to start; see {server_log}", file=sys.stderr)
            return 1
        target = server.target
        print(f"reward server: gRPC {server.target}, dashboard {server.http}/dashboard")
    with server:
        from advgrpo.common.errors import ConfigError
        from advgrpo.trainer.config import load_train_config
        from advgrpo.trainer.loop import AdvGrpoTrainer

        cfg = load_train_config(
            "toy",
            overrides={
                "reward": {"server": target},
                "adversarial": {"references": str(refs)},
                "run": {"output_dir": str(out / "run"), "epochs": epochs, "eval_every": 2, "save_every": 0},
            },
        )
        try:
            AdvGrpoTrainer(cfg).run()
        except ConfigError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 2
    run = out / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs_done = [r for r in records if "reward_mean" in r]
    d_updates = [r for r in epochs_done if "d_version" in r]
    grids = sorted((run / "samples").glob("*.png"))
    print()
    print(
        f"done in {time.perf_counter() - t0:.0f}s: {len(epochs_done)} epochs, "
        f"{len(d_updates)} discriminator updates (dino now at version {d_updates[-1]['d_version'] if d_updates else 0})"
    )
    for r in epochs_done:
        line = f"  epoch {r['epoch']}: reward {r['reward_mean']:+.3f}"
        if "reference_mean" in r:
            line += f" (references {r['reference_mean']:+.3f})"
        if "d_loss" in r:
            line += f", D loss {r['d_loss']:.3f} acc {r['d_accuracy']:.2f}"
        if "train_loss" in r:
            line += f", GRPO step {r['global_step']}"
        print(line)
    print(f"metrics:     {run / 'metrics.jsonl'}")
    print(f"samples:     {grids[-1] if grids else '-'}")
    print(f"checkpoint:  {run / 'checkpoints'} (LoRA in diffusers format under lora/)")
    if not args.server:
        print(f"server log:  {server_log} (the server has been stopped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

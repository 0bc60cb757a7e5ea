"""``make demo``: the whole system on the embedded default, in a few minutes on a CPU.

Starts the reward server (tiny preset: tiny DINOv2/CLIP in memory + real OCR), writes a small
synthetic reference set, runs Adv-GRPO epochs of the tiny SD3 preset against the server (the
DINO discriminator trains every other epoch, the generator in between), writes metrics, sample
grids and a checkpoint, stops the server and says where everything is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

DEMO_PROMPTS = [
    "a red apple on a table",
    "a blue car in the rain",
    "a green tree on a hill",
    "a yellow sun over the sea",
]


def main() -> int:
    out = Path(os.environ.get("DEMO_OUTPUT", "demo-output")).resolve()
    epochs = int(os.environ.get("DEMO_EPOCHS", "12"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from advgrpo.trainer.references import write_synthetic_references

    refs = write_synthetic_references(out / "references", DEMO_PROMPTS, per_prompt=4)
    print(f"reference set: {refs}")
    server_log = out / "reward-server.log"
    t0 = time.perf_counter()
    from advgrpo.common.process import ServerProcess

    try:
        server = ServerProcess(["--preset", "tiny", "--state-dir", str(out / "reward-state")], log_file=server_log)
    except RuntimeError:
        print(f"reward server failed to start; see {server_log}", file=sys.stderr)
        return 1
    with server:
        print(f"reward server: gRPC {server.target}, dashboard {server.http}/dashboard")
        from advgrpo.trainer.config import load_train_config
        from advgrpo.trainer.loop import AdvGrpoTrainer

        cfg = load_train_config(
            "tiny",
            overrides={
                "reward": {"server": server.target},
                "adversarial": {"references": str(refs)},
                "run": {"output_dir": str(out / "run"), "epochs": epochs, "eval_every": 2, "save_every": 0},
            },
        )
        AdvGrpoTrainer(cfg).run()
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
    print(f"server log:  {server_log} (the server has been stopped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

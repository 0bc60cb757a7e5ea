"""Runs the toy world's experiments: ``python -m experiments.toy_world.run --out DIR``.

Every run starts its own reward server (``--preset toy``: the toy DINOv2 discriminator, fresh, and
the saturation proxy) and fine-tunes the shipped toy SD3 with the trainer's ``toy`` preset (Adv-GRPO's
recipe scaled to a laptop), from the same weights, with the same seeds and budgets. Before the first
generator update and after every ``--eval-every``, it draws a fixed evaluation set (8 samples of each
of the 12 captions, from the same noise for every run and point: the trainer's deterministic sampler,
EMA weights) and measures it (``experiments.toy_world.metrics``) against held-out references of the
style the run aims at, which no discriminator ever sees.

The experiments (docs/EXPERIMENTS.md says what each one tests):

* ``hackable``: GRPO on the saturation proxy alone, a fixed scorer with a known bias;
* ``adv_grpo``: the same proxy plus the DINO discriminator, trained online against references from
  the data (the toy model's pretraining mixture; ratio schedule, k = 2: D and G take turns);
* ``transfer``: the DINO discriminator alone, trained against night references;
* ``ratio10``, ``trigger``: ``adv_grpo`` under Adv-GRPO's own ratio (k = 10: D on 9 epochs of 10)
  and under the trigger (D instead of G while the generations out-score the references);
* ``trigger_d_only``: the trigger as Adv-GRPO runs it (with PickScore), where the reward is the
  discriminator's alone: the DINO discriminator on references from the data.

Writes ``DIR/<experiment>/seed-<s>/`` (the trainer's run folder, ``curve.jsonl``, the trainer's
whole config, the server's settings over its toy preset, the server's log, ``samples-start.png`` and ``samples-end.png``), ``DIR/results.json``,
``DIR/curves.png``, ``DIR/schedules.png`` (when the schedule runs are there) and prints the table.
``--quick`` is the short version: ``make demo`` and the CI test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advgrpo.common import toy_domain as td
from experiments.toy_world import report

EVAL_PER_CAPTION = 8
EVAL_SEED = 12_345  # the evaluation set's noise: the same for every run and every point
REFERENCES_PER_CAPTION = 16  # the discriminator's references (training), per caption
REFERENCE_SEED = 1
HELD_OUT_PER_CAPTION = 24  # the distance's references (never shown to a discriminator)
HELD_OUT_SEED = 2
LEGEND = """
proxy: mean saturation, the fixed reward the hackable run optimises. KID x1000: distance to held-out
references (0: as close as fresh data). Caption accuracy: colour and shape both right, by a
rule-based checker. Diversity: spread within a caption over the references' (1: as varied). Night
share: samples in the night style (the data: 0.25). Start -> end; docs/EXPERIMENTS.md has the full
runs (3 seeds, 30 updates, the transfer and the schedules).
"""
QUICK = {"experiments": ["hackable", "adv_grpo"], "seeds": [0], "updates": 10, "eval_every": 5}


@dataclass(frozen=True)
class Experiment:
    name: str
    weights: dict[str, float]  # the generator's reward: model -> weight
    discriminator: str = "dino"  # "": no discriminator trains
    schedule: str = "ratio"
    ratio_k: int = 2
    # The references (training and held out): "data", the toy model's own pretraining mixture
    # (a quarter night), or "night", the other distribution.
    style: str = "data"
    about: str = ""

    def max_epochs(self, updates: int) -> int:
        return epochs_for(updates, self.discriminator, self.schedule, self.ratio_k)


def epochs_for(updates: int, discriminator: str, schedule: str, ratio_k: int) -> int:
    """Epochs that give ``updates`` generator updates; for the trigger, a bound that stops a run
    whose generator would never train again (such a run is recorded as ended short)."""
    if not discriminator or schedule == "off":
        return updates
    if schedule == "ratio":
        return updates * ratio_k
    return updates * 10


EXPERIMENTS = {
    e.name: e
    for e in (
        Experiment(
            "hackable",
            {"saturation": 1.0},
            discriminator="",
            schedule="off",
            about="GRPO on the saturation proxy alone",
        ),
        Experiment(
            "adv_grpo",
            {"saturation": 1.0, "dino": 1.0},
            about="the proxy plus the DINO discriminator on references from the data (ratio k=2)",
        ),
        Experiment(
            "transfer",
            {"dino": 1.0},
            style="night",
            about="the DINO discriminator alone, on night references (ratio k=2)",
        ),
        Experiment(
            "ratio10", {"saturation": 1.0, "dino": 1.0}, ratio_k=10, about="adv_grpo under Adv-GRPO's ratio (k=10)"
        ),
        Experiment(
            "trigger", {"saturation": 1.0, "dino": 1.0}, schedule="trigger", about="adv_grpo under the trigger schedule"
        ),
        Experiment(
            "trigger_d_only",
            {"dino": 1.0},
            schedule="trigger",
            about="the trigger as Adv-GRPO uses it: the discriminator's reward alone (references from the data)",
        ),  # fmt: skip
    )  # fmt: skip
}


REFERENCE_STYLES = ("data", "night")


def reference_style(style: str) -> dict[str, Any]:
    """``toy_domain.dataset``'s arguments for the references of ``style`` ("data" or "night")."""
    if style == "data":
        return {"style": "day", "night_share": td.PRETRAINING_NIGHT_SHARE}
    return {"style": style}


def eval_prompts() -> list[str]:
    return [c for c in td.captions() for _ in range(EVAL_PER_CAPTION)]


def trainer_settings(
    exp: Experiment, seed: int, updates: int, run_dir: Path, target: str, references: Path, sets=()
) -> dict[str, Any]:
    """The trainer's settings over its ``toy`` preset: the experiment's, then ``sets``; the epoch
    limit follows the schedule the settings end with (unless ``sets`` name run.epochs)."""
    from advgrpo.common.typed_config import apply_override

    settings: dict[str, Any] = {
        "reward": {"server": target, "weights": dict(exp.weights)},
        "adversarial": {
            "discriminator": exp.discriminator,
            "schedule": exp.schedule,
            "ratio_k": exp.ratio_k,
            "references": str(references),
        },
        "run": {
            "output_dir": str(run_dir / "trainer"), "seed": seed, "eval_every": 0, "save_every": 0,
        },
    }  # fmt: skip
    for assignment in sets:
        apply_override(settings, assignment)
    a = settings["adversarial"]
    epochs = epochs_for(updates, a["discriminator"], a["schedule"], a["ratio_k"])
    settings["run"].setdefault("epochs", epochs)
    return settings


def server_settings(sets=()) -> dict[str, Any]:
    """The reward server's settings over its ``toy`` preset: ``sets`` only."""
    from advgrpo.common.typed_config import apply_override

    settings: dict[str, Any] = {}
    for assignment in sets:
        apply_override(settings, assignment)
    return settings


@dataclass
class RunRecord:
    experiment: str
    seed: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    epochs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process: sampling, updates, evaluation
    server_cpu_s: float = 0.0  # the reward server's
    ended_short: bool = False  # the epoch limit came before the generator updates asked for


def run_one(
    exp: Experiment, seed: int, *, updates: int, eval_every: int, out: Path, references: Path, measure,
    trainer_sets=(), server_sets=(),
) -> RunRecord:  # fmt: skip
    """One run of ``exp``: epochs until ``updates`` generator updates, measured every ``eval_every``."""
    import psutil
    import torch

    from advgrpo.common.process import ServerProcess
    from advgrpo.trainer.config import dump_train_config, load_train_config
    from advgrpo.trainer.logs import save_grid
    from advgrpo.trainer.loop import AdvGrpoTrainer, generate_images, without_secrets

    run_dir = out / exp.name / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(exp.name, seed)
    prompts = eval_prompts()
    t0, me = time.perf_counter(), psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])

    class ToyWorldTrainer(AdvGrpoTrainer):
        """The trainer, counting what each epoch did, and measured on the evaluation set."""

        generator_updates = d_updates = images_sampled = 0

        def train_epoch(self, epoch: int) -> dict[str, Any]:
            metrics = super().train_epoch(epoch)
            self.images_sampled += self.cfg.sampling.batch_size * self.cfg.sampling.batches_per_epoch
            self.generator_updates += "train_loss" in metrics
            self.d_updates += "d_version" in metrics
            return metrics

        def measure(self, grid: str | None = None) -> None:
            with self._ema_weights():
                images = generate_images(self.pipe, prompts, self.cfg, seed=EVAL_SEED)
            point = {
                "generator_updates": self.generator_updates,
                "d_updates": self.d_updates,
                "images_sampled": self.images_sampled,
                **measure(images, prompts),
            }
            record.curve.append(point)
            with (run_dir / "curve.jsonl").open("a") as f:
                f.write(json.dumps(point) + "\n")
            if grid:
                save_grid(images, run_dir / f"samples-{grid}.png", columns=2 * EVAL_PER_CAPTION)

    server_config = run_dir / "reward-server.yaml"  # over the server's toy preset
    server_config.write_text(json.dumps(server_settings(server_sets), indent=1) + "\n")  # JSON is YAML
    server = ServerProcess(
        ["--preset", "toy", "--config", str(server_config), "--state-dir", str(run_dir / "reward-state")],
        http=False, log_file=run_dir / "reward-server.log",
    )  # fmt: skip
    with server:
        overrides = trainer_settings(exp, seed, updates, run_dir, server.target, references, trainer_sets)
        cfg = load_train_config("toy", overrides=overrides)
        (run_dir / "trainer-config.json").write_text(
            json.dumps(without_secrets(dump_train_config(cfg)), indent=1, default=str) + "\n"
        )
        torch.manual_seed(seed)
        trainer = ToyWorldTrainer(cfg)
        try:
            trainer.measure("start")
            epoch = 0
            while trainer.generator_updates < updates and epoch < cfg.run.epochs:
                metrics = trainer.train_epoch(epoch)
                epoch += 1
                g = trainer.generator_updates
                if "train_loss" in metrics and (g % eval_every == 0 or g >= updates):
                    trainer.measure("end" if g >= updates else None)
            if trainer.generator_updates < updates:  # the epoch limit: measure where it stopped
                record.ended_short = True
                if record.curve[-1]["generator_updates"] == trainer.generator_updates:
                    record.curve.pop()  # measured there already: that point becomes the end
                trainer.measure("end")
            record.epochs = epoch
            record.server_cpu_s = sum(psutil.Process(server.pid).cpu_times()[:2])
        finally:
            trainer.close()
    record.wall_s = time.perf_counter() - t0
    record.cpu_s = sum(me.cpu_times()[:2]) - cpu0
    return record


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def empty_output_folder(out: Path) -> None:
    """Empties ``out`` for a new run: only a folder that is empty or holds an earlier run (whose
    references/ the runner writes first), never another folder that happens to be named."""
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"--out {out}: not a folder")
        if any(out.iterdir()) and not (out / "references").is_dir():
            raise SystemExit(f"--out {out}: not empty and not an earlier run's folder (no references/): not emptied")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.toy_world.run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiments-output/toy_world"),
        help="emptied first, if empty or an earlier run's (any other folder is refused)",
    )
    p.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--updates", type=positive_int, default=30, help="generator updates per run (default 30)")
    p.add_argument(
        "--eval-every", type=positive_int, default=5, help="measure after every N generator updates (default 5)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trainer setting over the experiment's (e.g. adversarial.steps=2); repeatable",
    )
    p.add_argument(
        "--server-set",
        dest="server_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a reward-server setting over its toy preset (e.g. models.dino.params.lr=0.001)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the short version (make demo): hackable and adv_grpo, seed 0, 10 generator updates "
        "measured every 5, in place of --experiments, --seeds, --updates and --eval-every",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.experiments, args.seeds = QUICK["experiments"], QUICK["seeds"]
        args.updates, args.eval_every = QUICK["updates"], QUICK["eval_every"]
    out = args.out.resolve()
    empty_output_folder(out)
    from experiments.toy_world.metrics import Measure

    t0 = time.perf_counter()
    styles = sorted({EXPERIMENTS[e].style for e in args.experiments})
    from advgrpo.trainer.references import write_toy_references

    references = {
        s: write_toy_references(out / "references" / s, **reference_style(s), per_caption=REFERENCES_PER_CAPTION,
                                seed=REFERENCE_SEED)
        for s in styles
    }  # fmt: skip
    n_held_out = HELD_OUT_PER_CAPTION * len(td.captions())
    measure = Measure({s: td.dataset(n_held_out, seed=HELD_OUT_SEED, **reference_style(s)) for s in REFERENCE_STYLES})
    records: list[dict[str, Any]] = []
    for name in args.experiments:
        exp = EXPERIMENTS[name]
        for seed in args.seeds:
            print(f"{name}, seed {seed}: {exp.about}", file=sys.stderr, flush=True)
            rec = run_one(
                exp, seed, updates=args.updates, eval_every=args.eval_every, out=out,
                references=references[exp.style], measure=functools.partial(measure, target=exp.style),
                trainer_sets=args.sets, server_sets=args.server_sets,
            )  # fmt: skip
            records.append(asdict(rec))
            first, last = rec.curve[0], rec.curve[-1]
            if rec.ended_short:
                print(f"  ended short: {rec.epochs} epochs (the limit) gave fewer generator updates", file=sys.stderr)
            print(
                f"  {rec.epochs} epochs, {last['generator_updates']} generator updates in {rec.wall_s:.0f} s: "
                f"proxy {first['saturation']:.3f} -> {last['saturation']:.3f}, KID {first['kid']:.1f} -> "
                f"{last['kid']:.1f}, caption accuracy {first['both']:.2f} -> {last['both']:.2f}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    summary = report.summarise(records, {n: e.about for n, e in EXPERIMENTS.items()})
    results = {
        "argv": argv if argv is not None else sys.argv[1:],
        "updates": args.updates,
        "eval": {
            "per_caption": EVAL_PER_CAPTION,
            "seed": EVAL_SEED,
            "held_out_per_caption": HELD_OUT_PER_CAPTION,
            "references_per_caption": REFERENCES_PER_CAPTION,
        },
        "cpu_count": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": float(sum(r["cpu_s"] + r["server_cpu_s"] for r in records)),
        "summary": summary,
        "runs": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = [report.plot(records, out / "curves.png", only=report.CLAIMS)]
    if len(set(report.SCHEDULES) & set(args.experiments)) > 1:
        plots.append(report.plot(records, out / "schedules.png", x="images_sampled", only=report.SCHEDULES))
    print(report.table(summary))
    print(LEGEND)
    print(f"plots:   {', '.join(str(p) for p in plots)}")
    print(f"grids:   {out}/<experiment>/seed-<s>/samples-start.png and samples-end.png")
    print(f"results: {out / 'results.json'} ({results['wall_s'] / 60:.1f} min, {results['cpu_s'] / 60:.1f} CPU min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

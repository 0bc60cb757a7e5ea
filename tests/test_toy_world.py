"""The toy world's measurements and runner (experiments/toy_world): the feature network ships with
its record, the distances and the diversity measure behave as their definitions say, each
experiment runs with the settings it names, and the report summarises runs as it claims. The
short version of experiments 1 and 2 (what ``make demo`` runs) is tested in test_demo.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from advgrpo.common import toy_domain as td  # noqa: E402
from experiments.toy_world import report  # noqa: E402
from experiments.toy_world.features import FEATURE_NET_DIR, WEIGHTS, features, load_feature_net  # noqa: E402
from experiments.toy_world.metrics import Measure, caption_kid, kid, spread  # noqa: E402
from experiments.toy_world.run import EXPERIMENTS, Experiment, server_settings, trainer_settings  # noqa: E402


def test_feature_net_ships_with_its_record():
    record = json.loads((FEATURE_NET_DIR / "training.json").read_text())
    assert record["sha256"] == {WEIGHTS: hashlib.sha256((FEATURE_NET_DIR / WEIGHTS).read_bytes()).hexdigest()}
    assert record["command"].startswith("python -m experiments.toy_world.features")
    assert min(record["held_out_accuracy"].values()) >= 0.95, record["held_out_accuracy"]


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


def test_kid_is_near_zero_within_a_distribution_and_large_across_styles(net):
    day_a = features(net, td.dataset(240, style="day", seed=10, per_caption=False)[0])
    day_b = features(net, td.dataset(240, style="day", seed=11, per_caption=False)[0])
    night = features(net, td.dataset(240, style="night", seed=12, per_caption=False)[0])
    same, across = kid(day_a, day_b), kid(day_a, night)
    assert abs(same) < 0.02 * across, (same, across)


def test_caption_kid_compares_each_caption_with_its_own_references(net):
    refs, ref_texts = td.dataset(288, seed=5)
    samples, texts = td.dataset(96, seed=6)
    f_refs, f_samples = features(net, refs), features(net, samples)
    # Balanced sets (every caption equally often) bias the unconditional estimate below 0; per
    # caption, samples of the data's own distribution sit at 0 up to noise.
    assert kid(f_samples, f_refs) * 1000 < -40
    own = caption_kid(f_samples, texts, f_refs, ref_texts) * 1000
    assert abs(own) < 5, own
    # The same images under wrong captions (each caption's samples are another caption's) are far.
    shifted = [td.captions()[(td.captions().index(t) + 1) % 12] for t in texts]
    assert caption_kid(f_samples, shifted, f_refs, ref_texts) * 1000 > 100 * max(abs(own), 1)
    with pytest.raises(ValueError, match="needs at least 2"):
        caption_kid(f_samples[:1], texts[:1], f_refs, ref_texts)


def test_spread_is_zero_for_copies_and_the_references_own_for_fresh_scenes(net):
    images, texts = td.dataset(96, seed=3)
    f = features(net, images)
    copies = np.repeat(f[:12], 8, axis=0)
    assert spread(copies, [t for t in texts[:12] for _ in range(8)]) == pytest.approx(0.0, abs=1e-9)
    m = Measure({"day": td.dataset(288, seed=5)})
    assert 0.85 < spread(f, texts) / m.spreads["day"] < 1.15


def test_measure_reads_rendered_scenes_as_the_references_own_distribution():
    m = Measure({"day": td.dataset(288, seed=5), "night": td.dataset(288, style="night", seed=5)})
    day = m(*td.dataset(96, seed=4), target="day")
    assert day["colour"] == day["shape"] == day["both"] == 1.0 and day["night"] == 0.0
    assert abs(day["kid"]) < 5 and 0.85 < day["diversity"] < 1.15 and 0.1 < day["saturation"] < 0.4, day
    assert day["kid_day"] == day["kid"] and day["kid_night"] > 1000
    night = m(*td.dataset(96, style="night", seed=4), target="day")
    assert night["night"] == 1.0 and night["kid"] > 1000 and night["saturation"] > day["saturation"], night
    assert abs(m(*td.dataset(96, style="night", seed=4), target="night")["kid"]) < 5


def test_each_experiment_runs_with_the_settings_it_names(tmp_path):
    from advgrpo.trainer.config import load_train_config

    for exp in EXPERIMENTS.values():
        settings = trainer_settings(exp, 3, 30, tmp_path, "127.0.0.1:1", tmp_path / "refs.json")
        cfg = load_train_config("toy", overrides=settings)
        assert cfg.model.pretrained == "toy" and cfg.run.seed == 3 and cfg.reward.weights == exp.weights
        a = cfg.adversarial
        assert (a.discriminator, a.schedule, a.ratio_k) == (exp.discriminator, exp.schedule, exp.ratio_k)
        assert cfg.run.epochs == exp.max_epochs(30)
    assert EXPERIMENTS["hackable"].max_epochs(30) == 30  # no discriminator: every epoch updates G
    assert EXPERIMENTS["adv_grpo"].max_epochs(30) == 60 and EXPERIMENTS["ratio10"].max_epochs(30) == 300
    assert Experiment("t", {"dino": 1.0}, schedule="trigger").max_epochs(30) == 300
    # --set and --server-set land over the experiment's settings.
    settings = trainer_settings(EXPERIMENTS["adv_grpo"], 0, 30, tmp_path, "x:1", tmp_path, ["adversarial.steps=2"])
    assert settings["adversarial"]["steps"] == 2 and settings["adversarial"]["ratio_k"] == 2
    assert server_settings(["models.dino.params.lr=0.001"]) == {"models": {"dino": {"params": {"lr": 0.001}}}}
    # The epoch limit follows the schedule the settings end with.
    assert (
        trainer_settings(EXPERIMENTS["adv_grpo"], 0, 30, tmp_path, "x:1", tmp_path, ["adversarial.ratio_k=5"])["run"][
            "epochs"
        ]
        == 150
    )
    assert (
        trainer_settings(EXPERIMENTS["adv_grpo"], 0, 30, tmp_path, "x:1", tmp_path, ["run.epochs=7"])["run"]["epochs"]
        == 7
    )


def test_the_runner_empties_only_an_earlier_runs_folder(tmp_path):
    from experiments.toy_world.run import empty_output_folder, main

    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    with pytest.raises(SystemExit, match="not an earlier run's folder"):
        main(["--out", str(mine), "--experiments", "hackable", "--seeds", "0", "--updates", "1"])
    assert (mine / "notes").is_dir()
    earlier = tmp_path / "earlier"
    (earlier / "references").mkdir(parents=True)
    (earlier / "results.json").write_text("{}")
    empty_output_folder(earlier)
    assert earlier.is_dir() and not any(earlier.iterdir())
    with pytest.raises(SystemExit):
        main(["--eval-every", "0"])


def _record(name, seed, saturation, kid_values):
    curve = [
        {"generator_updates": 5 * i, "d_updates": 0, "images_sampled": 160 * i, "saturation": s, "kid": k,
         "both": 1.0, "diversity": 1.0, "night": 0.0}
        for i, (s, k) in enumerate(zip(saturation, kid_values, strict=True))
    ]  # fmt: skip
    return {"experiment": name, "seed": seed, "curve": curve, "epochs": 10, "wall_s": 1.0, "cpu_s": 2.0,
            "server_cpu_s": 1.0}  # fmt: skip


def test_report_summarises_start_and_end_over_seeds_and_plots(tmp_path):
    records = [_record("a", 0, [0.2, 0.4], [10, 30]), _record("a", 1, [0.2, 0.6], [10, 50])]
    records.append(_record("b", 0, [0.2, 0.25], [10, 12]))
    summary = report.summarise(records, {"a": "about a"})
    a = summary["a"]
    assert a["seeds"] == [0, 1] and a["about"] == "about a" and a["cpu_s"] == 6.0
    assert a["end"]["saturation"] == {"mean": 0.5, "std": pytest.approx(0.1), "min": 0.4, "max": 0.6}
    assert a["start"]["kid"]["mean"] == 10 and a["end"]["kid"]["max"] == 50 and a["images_sampled"] == 160
    rows = report.table(summary).splitlines()
    assert rows[2].startswith("| a | 2 | 5 | 160 | 0.200 → 0.500 ± 0.100 | 10.0 → 40.0 ± 10.0 |"), rows[2]
    assert "± " not in rows[3].split("|")[5]  # one seed: no spread to show
    path = report.plot(records, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publish_puts_runs_of_several_folders_together(tmp_path):
    from PIL import Image

    def folder(name, records):
        out = tmp_path / name
        for r in records:
            run = out / r["experiment"] / f"seed-{r['seed']}"
            run.mkdir(parents=True)
            for tag in ("start", "end"):
                Image.new("RGB", (64, 32), "grey").save(run / f"samples-{tag}.png")
        summary = report.summarise(records, {r["experiment"]: "about" for r in records})
        results = {"argv": [name], "cpu_s": 60.0, "wall_s": 30.0, "summary": summary, "runs": records}
        (out / "results.json").write_text(json.dumps(results))
        return out

    a = folder("a", [_record("hackable", 0, [0.2, 0.4], [10, 30]), _record("adv_grpo", 0, [0.2, 0.2], [10, 11])])
    b = folder("b", [_record("trigger", 0, [0.2, 0.3], [10, 20]), _record("trigger", 1, [0.2, 0.5], [10, 40])])
    docs = tmp_path / "docs"
    written = report.publish([a, b], docs)
    assert {p.name for p in written} == {
        "curves.png", "schedules.png", "summary.json", "samples-hackable.png", "samples-adv_grpo.png",
        "samples-trigger.png",
    }  # fmt: skip
    record = json.loads((docs / "summary.json").read_text())
    assert list(record["summary"]) == ["hackable", "adv_grpo", "trigger"] and record["cpu_s"] == 120.0
    assert record["summary"]["trigger"]["end"]["kid"]["mean"] == 30 and "| trigger | 2 |" in record["table"]
    # The trigger's grid: the start, then each seed's end.
    assert Image.open(docs / "samples-trigger.png").height == 3 * (32 + 14)

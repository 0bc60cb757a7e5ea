"""The toy world's report: per-experiment summaries over seeds, the table, and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

METRICS = ("saturation", "kid", "both", "diversity", "night")  # the table's and the plots'
CLAIMS = ("hackable", "adv_grpo", "transfer")  # the paper's three claims, against generator updates
SCHEDULES = ("adv_grpo", "ratio10", "trigger", "trigger_d_only")  # compared by the samples they cost
SUMMARISED = (*METRICS, "colour", "shape", "kid_data", "kid_night")
LABELS = {
    "saturation": "proxy reward (saturation)",
    "kid": "KID x1000 to held-out references",
    "both": "caption accuracy (colour and shape)",
    "diversity": "diversity (within-caption spread / references')",
    "night": "night-style share",
}


def spread_of(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def summarise(records: Sequence[dict[str, Any]], about: dict[str, str]) -> dict[str, Any]:
    """Per experiment: every metric at the start and at the end (mean, std, min and max over
    seeds), and what the runs cost."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["experiment"] for r in records):
        runs = [r for r in records if r["experiment"] == name]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "about": about.get(name, "")}
        for point, index in (("start", 0), ("end", -1)):
            entry[point] = {
                m: spread_of([r["curve"][index][m] for r in runs]) for m in SUMMARISED if m in runs[0]["curve"][0]
            }
        last = [r["curve"][-1] for r in runs]
        for key in ("generator_updates", "d_updates", "images_sampled"):
            entry[key] = float(np.mean([p[key] for p in last]))
        entry["epochs"] = float(np.mean([r["epochs"] for r in runs]))
        entry["cpu_s"] = float(sum(r["cpu_s"] + r["server_cpu_s"] for r in runs))
        entry["wall_s"] = float(sum(r["wall_s"] for r in runs))
        out[name] = entry
    return out


def table(summary: dict[str, Any]) -> str:
    """A Markdown table: each metric as start -> end mean ± std over seeds."""
    rows = [
        "| run | seeds | G updates | images sampled | proxy (saturation) | KID x1000 | caption accuracy | diversity | night share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(entry: dict[str, Any], m: str, digits: int) -> str:
        s, e = entry["start"][m], entry["end"][m]
        spread = f" ± {e['std']:.{digits}f}" if len(entry["seeds"]) > 1 else ""
        return f"{s['mean']:.{digits}f} → {e['mean']:.{digits}f}{spread}"

    for name, e in summary.items():
        rows.append(
            f"| {name} | {len(e['seeds'])} | {e['generator_updates']:.0f} | {e['images_sampled']:.0f} | "
            f"{cell(e, 'saturation', 3)} | {cell(e, 'kid', 1)} | {cell(e, 'both', 2)} | {cell(e, 'diversity', 2)} | "
            f"{cell(e, 'night', 2)} |"
        )
    return "\n".join(rows)


def plot(records: Sequence[dict[str, Any]], path: Path, *, x: str = "generator_updates", only=None) -> Path:
    """One panel per metric against ``x`` (generator updates, or images sampled): each
    experiment's mean over seeds with its min-max band, or each seed's curve where the seeds were
    measured at different x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["experiment"] for r in records))
    names = [n for n in names if n in only] or names if only is not None else names
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, m in zip(axes, METRICS, strict=True):
        for name in names:
            runs = [r for r in records if r["experiment"] == name]
            points = [{p[x]: p[m] for p in r["curve"]} for r in runs]
            if all(set(p) == set(points[0]) for p in points):  # the seeds measured at the same x
                xs = sorted(points[0])
                ys = np.array([[p[v] for v in xs] for p in points])
                (line,) = ax.plot(xs, ys.mean(axis=0), label=name, marker="o", markersize=3)
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
            else:  # each seed where it was measured (the trigger's samples differ per seed)
                colour = None
                for i, p in enumerate(points):
                    xs = sorted(p)
                    (line,) = ax.plot(xs, [p[v] for v in xs], label=name if i == 0 else None, marker="o",
                                      markersize=2, linewidth=0.8, color=colour)  # fmt: skip
                    colour = line.get_color()
        if m == "kid":
            ax.set_yscale("symlog", linthresh=10.0)  # from ~0 (the data's own) to thousands (hacked)
        ax.set_title(LABELS[m], fontsize=9)
        ax.set_xlabel(x.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def labelled_stack(panels: Sequence[tuple[str, Path]], path: Path) -> Path:
    """Sample grids one above the other, each under a one-line label."""
    from PIL import Image, ImageDraw

    images = [(label, Image.open(p).convert("RGB")) for label, p in panels]
    width = max(im.width for _, im in images)
    strip = 14
    out = Image.new("RGB", (width, sum(im.height + strip for _, im in images)), "white")
    y = 0
    draw = ImageDraw.Draw(out)
    for label, im in images:
        draw.text((2, y + 1), label, fill="black")
        out.paste(im, (0, y + strip))
        y += im.height + strip
    out.quantize(256).save(path, optimize=True)  # a palette: a third of the bytes, no visible change
    return path


def publish(sources: Sequence[Path], docs: Path) -> list[Path]:
    """What docs/EXPERIMENTS.md shows, from finished run folders (their runs together): the plots,
    the summary and table, and per experiment its sample grids (the shared start, then each seed's
    end) in one image."""
    import json

    docs.mkdir(parents=True, exist_ok=True)
    loaded = [(out, json.loads((out / "results.json").read_text())) for out in sources]
    runs = [run for _, results in loaded for run in results["runs"]]
    where = {run["experiment"]: out for out, results in loaded for run in results["runs"]}
    about = {name: e["about"] for _, results in loaded for name, e in results["summary"].items()}
    summary = summarise(runs, about)
    written = [plot(runs, docs / "curves.png", only=CLAIMS)]
    schedules = [n for n in SCHEDULES if n in summary]
    if len(schedules) > 1:
        written.append(plot(runs, docs / "schedules.png", x="images_sampled", only=schedules))
    record = {
        "sources": [{k: v for k, v in results.items() if k not in ("runs", "summary")} for _, results in loaded],
        "cpu_s": sum(results["cpu_s"] for _, results in loaded),
        "wall_s": sum(results["wall_s"] for _, results in loaded),
        "summary": summary,
        "table": table(summary),
    }
    (docs / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    written.append(docs / "summary.json")
    for name, entry in summary.items():
        out = where[name]
        seeds = entry["seeds"]
        panels = [(f"{name}: start (the pretrained model)", out / name / f"seed-{seeds[0]}" / "samples-start.png")]
        panels += [(f"{name}: seed {s}, end", out / name / f"seed-{s}" / "samples-end.png") for s in seeds]
        written.append(labelled_stack(panels, docs / f"samples-{name}.png"))
    return written


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m experiments.toy_world.report", description=publish.__doc__.split("\n")[0]
    )
    p.add_argument(
        "--from", dest="sources", type=Path, nargs="+", required=True,
        help="run folders (experiments.toy_world.run --out), their runs together",
    )  # fmt: skip
    p.add_argument("--to", type=Path, required=True, help="where the plots, summary and grids go (docs/toy_world)")
    args = p.parse_args()
    for written in publish(args.sources, args.to):
        print(written)

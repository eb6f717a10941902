"""The demo's comparison over several seeds: mean +- std of teacher, distilled student and baseline.

    .venv/bin/python bench/demo_seeds.py --seeds 0 1 2            # the full demo per seed, runs/demo_seeds/seedN
    .venv/bin/python bench/demo_seeds.py --seeds 0 1 2 --summarize-only

Each seed is a full `mmkd demo` (new world, splits, initialisations and data order). Writes
runs/demo_seeds/summary.json and prints markdown tables (overall and per category in both modes, per question
family in the headline mode, and the per-seed difference student_kd - student_no_kd) for docs/results.md.
Extra `--set KEY=VALUE` pairs are passed to `mmkd.demo.demo_command` (e.g. `--set dft_steps=60`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MODELS = ("teacher", "student_kd", "student_no_kd")
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


def summarize(results: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean and std over seeds, and the markdown tables."""
    seeds = sorted(results)
    summary: dict[str, Any] = {"seeds": seeds, "models": {}}
    lines = [f"Seeds: {', '.join(map(str, seeds))}. Accuracy (%) on the held-out test split, mean ± std over seeds.",
             ""]
    for mode in ("generate", "likelihood"):
        lines += [f"**{mode}**" + (" (headline)" if mode == "generate" else ""), "",
                  "| model | all | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
        for name in MODELS:
            per = [results[s][name][mode] for s in seeds]
            row = {"accuracy": _mean_std([m["accuracy"] for m in per])}
            cells = [_fmt([m["accuracy"] for m in per])]
            for c in CATEGORIES:
                vals = [m["categories"][c]["accuracy"] for m in per if m["categories"][c]["accuracy"] is not None]
                row[c] = _mean_std(vals) if vals else None
                cells.append(_fmt(vals) if vals else "-")
            summary["models"].setdefault(name, {})[mode] = row
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    skills = sorted({k for s in seeds for k in results[s]["teacher"]["skills"]["generate"]})
    lines += ["**generate, per question family**", "", "| family | " + " | ".join(MODELS) + " |",
              "|---" * (len(MODELS) + 1) + "|"]
    for skill in skills:
        cells = []
        for name in MODELS:
            vals = [results[s][name]["skills"]["generate"][skill]["accuracy"] for s in seeds
                    if skill in results[s][name]["skills"]["generate"]]
            cells.append(_fmt(vals))
        lines.append(f"| {skill} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["**per seed: student_kd - student_no_kd (points)**", "", "| seed | generate | likelihood | seconds |",
              "|---|---|---|---|"]
    diffs: dict[str, list[float]] = {"generate": [], "likelihood": []}
    for s in seeds:
        d = {m: results[s]["student_kd"][m]["accuracy"] - results[s]["student_no_kd"][m]["accuracy"]
             for m in diffs}
        for m in diffs:
            diffs[m].append(d[m])
        seconds = results[s]["setting"]["seconds"]["total"]
        lines.append(f"| {s} | {d['generate']:+.1f} | {d['likelihood']:+.1f} | {seconds:.0f} |")
    summary["kd_minus_no_kd"] = {m: _mean_std(v) for m, v in diffs.items()}
    summary["kd_wins_every_seed"] = {m: all(x > 0 for x in v) for m, v in diffs.items()}
    lines.append("")
    return summary, "\n".join(lines)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--summarize-only", action="store_true", help="Only read existing seedN/results.json.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="An argument of mmkd.demo.demo_command, e.g. dft_steps=60.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    extra = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    results = {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        if not args.summarize_only:
            from mmkd.demo import demo_command

            demo_command(out=str(folder), seed=seed, **extra)
        results[seed] = json.loads((folder / "results.json").read_text())
    summary, markdown = summarize(results)
    summary["settings"] = {s: r["setting"] for s, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny LLaVA-MoD on the demo's world, next to the demo's teacher, distilled student and baseline (one seed).

    .venv/bin/python bench/demo_mod.py                          # mmkd demo (seed 0) into runs/demo_mod/base, then MoD
    .venv/bin/python bench/demo_mod.py --base runs/demo_time    # reuse a finished demo folder of the same seed

Runs ``recipes/tiny/demo_mod.yaml`` (adapter -> dense mimic -> sparse mimic on the upcycled MoE student ->
DPO with the teacher as reference) with the demo's trained teacher, random initial student parts and student data
(labelled answers + the teacher's answers on the transfer set). The world's captions and preference pairs are
restricted to the labelled problems: both state the true answer (a caption says what a picture holds), and the
transfer set's true answers never reach a demo student. Scores the final MoE student, the MoE student before the
preference stage and the dense-mimic student on the held-out test split (generate and likelihood), counts active
and total parameters, and writes ``OUT/results.json``; prints markdown tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
MOD_STAGES = {"mod_dense_mimic": "dense_mimic", "mod_sparse_mimic": "sparse_mimic", "mod_final": "preference"}


def _labelled_only(src: Path, dst: Path, labelled: set[str]) -> int:
    """Copy the records of a world json list whose ``id`` is a labelled problem; returns how many."""
    records = [r for r in json.loads(src.read_text()) if str(r["id"]) in labelled]
    if not records:
        raise ValueError(f"{src}: no record of a labelled problem (expected ids from the demo's 'labelled' split)")
    dst.write_text(json.dumps(records, indent=1) + "\n")
    return len(records)


def _parameters(folder: Path) -> dict[str, int]:
    from mmkd.models import MLLMStudent, count_parameters

    return count_parameters(MLLMStudent.from_pretrained(folder))


def _table(rows: dict[str, dict[str, Any]], mode: str) -> list[str]:
    lines = ["| model | all | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for name, entry in rows.items():
        m = entry[mode]
        cells = [f"{m['accuracy']:.2f}"]
        for c in CATEGORIES:
            acc = m["categories"].get(c, {}).get("accuracy")
            cells.append(f"{acc:.2f}" if acc is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo_mod", help="Output folder.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="A finished `mmkd demo` folder to reuse (default: run the demo "
                                                     "into OUT/base).")
    parser.add_argument("--threads", type=int, default=1, help="Torch intra-op threads (the demo uses 1).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override of recipes/tiny/demo_mod.yaml (e.g. sparse_steps=200).")
    args = parser.parse_args(argv)

    import torch

    from mmkd.demo import _by_skill, _evaluate, demo_command, recipe_path
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import run_recipe

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def echo(message: str) -> None:
        print(f"[demo_mod {time.perf_counter() - start:6.1f}s] {message}", flush=True)

    t0 = time.perf_counter()
    if args.base is None:
        base = out / "base"
        echo(f"mmkd demo, seed {args.seed}, into {base}")
        demo_command(out=str(base), seed=args.seed, threads=args.threads)
        torch.set_num_threads(args.threads)
    else:
        base = Path(args.base)
    demo = json.loads((base / "results.json").read_text())
    if demo["setting"]["seed"] != args.seed:
        raise ValueError(f"{base / 'results.json'}: seed {demo['setting']['seed']}, expected {args.seed}")
    timings["demo"] = round(time.perf_counter() - t0, 1)

    world = base / "world"
    labelled = {str(p) for p in json.loads((base / "student_data" / "pid_splits.json").read_text())["labelled"]}
    mod_data = out / "mod_data"
    mod_data.mkdir(parents=True, exist_ok=True)
    counts = {"captions": _labelled_only(world / "captions.json", mod_data / "captions.json", labelled),
              "preference_pairs": _labelled_only(world / "preference.json", mod_data / "preference.json", labelled)}
    echo(f"labelled-only adapter/preference data: {counts}")

    run = out / "mod"
    overrides = ["--seed", str(args.seed), "--demo_root", str(base), "--mod_data", str(mod_data),
                 "--run_dir", str(run)]
    for pair in args.set:
        key, _, value = pair.partition("=")
        overrides += [f"--{key}", value]
    recipe = load_recipe(recipe_path("demo_mod"), overrides)
    t0 = time.perf_counter()
    echo("tiny LLaVA-MoD: adapter -> dense_mimic -> sparse_mimic (MoE) -> preference (recipes/tiny/demo_mod.yaml)")
    manifest = run_recipe(recipe, echo=echo)
    timings["mod_fit"] = round(time.perf_counter() - t0, 1)
    stages = {name: {"wall_time_s": e.get("wall_time_s"), "global_step": e.get("global_step"),
                     "metrics": e.get("metrics")} for name, e in manifest["stages"].items()}

    results: dict[str, Any] = {name: {k: demo[name][k] for k in ("generate", "likelihood", "skills")}
                               for name in ("teacher", "student_kd", "student_no_kd")}
    results["teacher"]["parameters"] = _parameters(base / "teacher" / "stages" / "train" / "student")
    results["student_kd"]["parameters"] = _parameters(base / "kd" / "stages" / "dft" / "student")
    results["student_no_kd"]["parameters"] = _parameters(base / "no_kd" / "stages" / "dft" / "student")
    t0 = time.perf_counter()
    for name, stage in MOD_STAGES.items():
        entry: dict[str, Any] = {"skills": {}}
        for mode in ("generate", "likelihood"):
            echo(f"evaluating {name} (stage {stage}) on the test split ({mode})")
            where = out / "eval" / name / f"test-{mode}"
            entry[mode] = _evaluate(str(run), world, "test", where, mode, 64, stage=stage)
            entry["skills"][mode] = _by_skill(world, where / "answers.jsonl")
        entry["parameters"] = _parameters(run / "stages" / stage / "student")
        results[name] = entry
    timings["mod_eval"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    load_after = os.getloadavg()
    results["setting"] = {
        "seed": args.seed, "base": str(base), "recipe": "recipes/tiny/demo_mod.yaml",
        "overrides": overrides, "labelled_only_data": counts, "stages": stages, "threads": torch.get_num_threads(),
        "seconds": timings, "demo_seconds": demo["setting"]["seconds"],
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    rows = {k: v for k, v in results.items() if k != "setting"}
    for mode in ("generate", "likelihood"):
        print(f"\n**{mode}**\n")
        print("\n".join(_table(rows, mode)))
    print("\n| model | total parameters | active per token |\n|---|---|---|")
    for name, entry in rows.items():
        print(f"| {name} | {entry['parameters']['total']:,} | {entry['parameters']['active']:,} |")
    skills = sorted(results["teacher"]["skills"]["generate"])
    print("\n| family | " + " | ".join(rows) + " |\n" + "|---" * (len(rows) + 1) + "|")
    for skill in skills:
        cells = [f"{rows[n]['skills']['generate'][skill]['accuracy']:.1f}" for n in rows]
        print(f"| {skill} | " + " | ".join(cells) + " |")
    print("\nstage metrics:", json.dumps(stages, indent=1))
    print(f"seconds: {timings}; load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

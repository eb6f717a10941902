"""What logit distillation adds beyond the teacher's answers in the demo world: an ablation over 3 seeds.

Every variant is recipes/tiny/demo_kd.yaml (DPT on the transfer prompts -> SFT on the labelled set -> DFT on both)
with the same student, initial weights, data order, optimizer, steps and held-out test split as the demo of that
seed; only the objectives change:

* ``no_kd``: the demo's baseline (recipes/tiny/demo_no_kd.yaml: LM loss, labelled set only; from the demo);
* ``seq_kd``: LM loss on the labelled set and on the teacher-answered transfer set (the transfer split holds the
  teacher's own answers): the teacher's answers without its logits;
* ``kl_response``: LM (DFT) + MDist's response term only (forward KL on answer tokens, ``visual_weight: 0``);
* ``kl_visual``: + MDist's visual-token term (MDist as the demo uses it), no RDist;
* ``kd``: + RDist (the demo's distilled student, from the demo);
* ``kd_hidden``: the same with RDist on the final hidden states (``rdist.on: hidden``).

Each student is scored with ``mmkd eval`` in generate mode (LLaVA's rules, the demo's headline) on the test split,
overall, per category and per question family of the world. The demos are reused when ``OUT/demoS/results.json``
exists (bench/teacher_hacking.py writes the same folders: ``--out runs/teacher_hacking`` shares them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_ablation.py --out runs/teacher_hacking   # ~15 min with the demos
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from teacher_hacking import demo_of, mmkd, run_seeds  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny" / "demo_kd.yaml"
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def _objectives(dpt: dict, dft: dict, dpt_args: dict, dft_args: dict) -> list[str]:
    return ["--stages.dpt.objectives", json.dumps(dpt), "--stages.dpt.objective_args", json.dumps(dpt_args),
            "--stages.dft.objectives", json.dumps(dft), "--stages.dft.objective_args", json.dumps(dft_args)]


RDIST = {"rdist": {"normalize": True}}
VARIANTS = {
    "seq_kd": _objectives({"lm": 1.0}, {"lm": 1.0}, {}, {}),
    "kl_response": _objectives({"mdist": 1.0}, {"lm": 1.0, "mdist": 1.0}, {"mdist": {"visual_weight": 0.0}},
                               {"mdist": {"visual_weight": 0.0}}),
    "kl_visual": _objectives({"mdist": 1.0}, {"lm": 1.0, "mdist": 1.0}, {}, {}),
    "kd_hidden": _objectives({"mdist": 1.0, "rdist": 1.0}, {"lm": 1.0, "mdist": 1.0, "rdist": 1.0},
                             {"rdist": {"normalize": True, "on": "hidden"}},
                             {"rdist": {"normalize": True, "on": "hidden"}}),
}
ORDER = ("no_kd", "seq_kd", "kl_response", "kl_visual", "kd", "kd_hidden")


def _scores(metrics: dict, skills: dict) -> dict:
    cats = {c: metrics["categories"][c]["accuracy"] for c in CATEGORIES if c in metrics.get("categories", {})}
    return {"accuracy": metrics["accuracy"], "categories": cats,
            "skills": {k: v["accuracy"] for k, v in skills.items()}}


def run_seed(out: Path, seed: int) -> dict[str, dict]:
    from mmkd.demo import _by_skill

    demo = demo_of(out, seed)
    world = demo / "world"
    results = {}
    demo_results = json.loads((demo / "results.json").read_text())
    for name, source in (("no_kd", "student_no_kd"), ("kd", "student_kd")):
        answers = demo / "eval" / source / "test-generate" / "answers.jsonl"
        results[name] = _scores(demo_results[source]["generate"], _by_skill(world, answers))
    for name, overrides in VARIANTS.items():
        run = out / f"ablation{seed}" / name
        where = run / "eval" / "dft" / "test-generate"
        if not (where / "metrics.json").is_file():
            t0 = time.time()
            mmkd("fit", str(RECIPE), "--demo_root", str(demo), "--seed", str(seed), "--run_dir", str(run),
                 "--trainer.enable_progress_bar", "false", *overrides)
            mmkd("eval", str(run), "--data", f"sqa:{world}", "--split", "test", "--max-new-tokens", "6")
            print(f"seed {seed} {name}: {time.time() - t0:.0f} s", flush=True)
        metrics = json.loads((where / "metrics.json").read_text())
        results[name] = _scores(metrics, _by_skill(world, where / "answers.jsonl"))
    return results


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    per_seed = run_seeds(__doc__.split("\n")[0], run_seed, "ablation.json")
    seeds = list(per_seed)
    print(f"\nseeds {seeds}; test accuracy (%), generate mode; mean ± std over seeds")
    print("| variant | all | " + " | ".join(CATEGORIES) + " | Δ vs seq_kd (per seed) |")
    print("|---" * (len(CATEGORIES) + 3) + "|")
    for name in ORDER:
        row = [_fmt([per_seed[s][name]["accuracy"] for s in seeds])]
        row += [_fmt([per_seed[s][name]["categories"].get(c, float("nan")) for s in seeds]) for c in CATEGORIES]
        delta = ", ".join(f"{per_seed[s][name]['accuracy'] - per_seed[s]['seq_kd']['accuracy']:+.1f}" for s in seeds)
        print(f"| {name} | " + " | ".join(row) + f" | {delta} |")
    skills = sorted(per_seed[seeds[0]]["no_kd"]["skills"])
    print("\nper question family (test accuracy %, mean ± std over seeds)")
    print("| variant | " + " | ".join(skills) + " |")
    print("|---" * (len(skills) + 1) + "|")
    for name in ORDER:
        print(f"| {name} | " + " | ".join(_fmt([per_seed[s][name]["skills"].get(k, float("nan")) for s in seeds])
                                           for k in skills) + " |")


if __name__ == "__main__":
    main()

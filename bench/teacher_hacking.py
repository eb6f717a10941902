"""The teacher-hacking check (Tiapkin et al., 2025) on the synthetic world: teacher-forced KD vs on-policy KD (GKD,
lam = 0.5 and 1) vs sequence-level KD, 3 seeds, the same optimizer steps.

Per seed: ``mmkd demo --seed S`` (its world, teacher and students; reused when ``OUT/demoS/results.json`` exists),
then four DFT stages of recipes/tiny/gkd.yaml from the same starting student, the demo's KD student after DPT and
SFT (``demoS/kd/stages/sft/student``), on the same data (labelled + transfer, ``dft``), 450 steps of batch 16:

* ``kd``: task distill, JSD(0.5) on the data's answers (teacher-forced: the transfer answers are the teacher's own);
* ``gkd_0.5``, ``gkd_1``: task gkd, JSD(0.5), lam = 0.5 and 1 (the student samples at temperature 1, <= 8 tokens);
* ``seq_kd``: task seq_kd, LM loss on the teacher's greedy answers (<= 8 tokens).

Each student is scored on the held-out test split with ``mmkd eval`` (generate mode), and with the proxy of the
paper: the divergence to the teacher on held-out prompts (the test split's), JSD(0.5) and forward KL(teacher ||
student) per answer token, (a) teacher-forced on the test answers and (b) on the student's own greedy answers.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_hacking.py --out runs/teacher_hacking     # ~25 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "gkd.yaml"
METHODS = {
    "kd": ["--stages.dft.task", "distill", "--stages.dft.task_args", "{}"],
    "gkd_0.5": ["--lam", "0.5"],
    "gkd_1": ["--lam", "1.0"],
    "seq_kd": ["--stages.dft.task", "seq_kd", "--stages.dft.task_args", '{"max_new_tokens": 8}',
               "--stages.dft.objectives", '{"lm": 1.0}', "--stages.dft.objective_args", "{}"],
}


def mmkd(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmkd", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"mmkd {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def demo_of(out: Path, seed: int) -> Path:
    """``OUT/demoS``: the finished ``mmkd demo --seed S`` (run here unless its results.json exists)."""
    demo = out / f"demo{seed}"
    if not (demo / "results.json").is_file():
        mmkd("demo", "--out", str(demo), "--seed", str(seed))
    return demo


def run_seeds(description: str, run_seed, results_name: str) -> dict:
    """``--out``/``--seeds`` from the command line, ``run_seed(out, seed)`` per seed, written to OUT/results_name."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="runs/teacher_hacking")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {seed: run_seed(out, seed) for seed in args.seeds}
    (out / results_name).write_text(json.dumps(per_seed, indent=1) + "\n")
    return per_seed


def proxy(student_dir: str, teacher_dir: str, world: str, max_new_tokens: int = 8) -> dict[str, float]:
    """Mean per-token JSD(0.5) and KL(teacher || student) on the test split, teacher-forced and on student samples."""
    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.losses import JSD, ForwardKL
    from mmkd.models import LlavaModel, align_vocab
    from mmkd.objectives import answer_positions
    from mmkd.tasks.sequences import answer_batch, trim_answers

    teacher, student = LlavaModel(teacher_dir).freeze(), LlavaModel(student_dir).freeze()
    align_vocab(teacher, student)
    data = ScienceQA(world, "test")
    collate = MultimodalCollator.for_models(student, teacher, max_length=128, prompts=True)
    sums = {k: 0.0 for k in ("jsd_tf", "kl_tf", "jsd_own", "kl_own")}
    counts = {"tf": 0, "own": 0}
    jsd, kl = JSD(0.5), ForwardKL()
    with torch.no_grad():
        for start in range(0, len(data), 32):
            batch = collate([data[i] for i in range(start, min(start + 32, len(data)))])
            answers = trim_answers(student.generate(batch.prompt, max_new_tokens=max_new_tokens),
                                   student.end_token_ids)
            own, _ = answer_batch(batch, answers, student.tokenizer.pad_token_id, 128, teacher.tokenizer.pad_token_id)
            for tag, b in (("tf", batch), ("own", own)):
                s_out, t_out = student(**b.inputs.kwargs()), teacher(**b.teacher_side()[0].kwargs())
                s = s_out.logits(s_out.last_hidden[answer_positions(b.labels)]).float()
                t = t_out.logits(t_out.last_hidden[answer_positions(b.teacher_side()[1])]).float()
                sums[f"jsd_{tag}"] += float(jsd.per_token(s, t).sum())
                sums[f"kl_{tag}"] += float(kl.per_token(s, t).sum())
                counts[tag] += s.shape[0]
    return {k: v / max(1, counts[k.split("_")[1]]) for k, v in sums.items()}


def run_seed(out: Path, seed: int) -> dict[str, dict]:
    demo = demo_of(out, seed)
    start = demo / "kd" / "stages" / "sft" / "student"
    results: dict[str, dict] = {}
    for method, overrides in METHODS.items():
        run = out / f"seed{seed}" / method
        if not (run / "eval" / "dft" / "test-generate" / "metrics.json").is_file():
            t0 = time.time()
            mmkd("fit", str(RECIPE), "--demo_root", str(demo), "--seed", str(seed), "--run_dir", str(run),
                 "--stage", "dft", "--stages.dft.init_from", str(start), "--trainer.enable_progress_bar", "false",
                 *overrides)
            mmkd("eval", str(run), "--data", f"sqa:{demo / 'world'}", "--split", "test", "--max-new-tokens", "6")
            print(f"seed {seed} {method}: {time.time() - t0:.0f} s", flush=True)
        metrics = json.loads((run / "eval" / "dft" / "test-generate" / "metrics.json").read_text())
        stage = json.loads((run / "manifest.json").read_text())["stages"]["dft"]
        results[method] = {"accuracy": metrics["accuracy"], "wall_time_s": stage["wall_time_s"],
                           "steps": stage["global_step"], "metrics": stage["metrics"],
                           **proxy(str(run / "stages" / "dft" / "student"), str(demo / "teacher" / "stages" / "train"
                                                                                 / "student"), str(demo / "world"))}
    demo_results = json.loads((demo / "results.json").read_text())
    for name in ("teacher", "student_kd", "student_no_kd"):
        results[name] = {"accuracy": demo_results[name]["generate"]["accuracy"]}
    return results


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    per_seed = run_seeds(__doc__.split("\n")[0], run_seed, "results.json")
    seeds = list(per_seed)
    print(f"\nseeds {seeds}; mean ± std over seeds; accuracy (%) on the test split (generate mode); proxy: "
          "per-token divergence to the teacher on the test prompts, teacher-forced (tf) and on the student's greedy "
          "answers (own)")
    print("| model | accuracy | JSD tf | JSD own | KL tf | KL own | DFT wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in (*METHODS, "student_kd", "student_no_kd", "teacher"):
        rows = [per_seed[s][name] for s in seeds]
        cells = [mean_std([r["accuracy"] for r in rows])]
        for key in ("jsd_tf", "jsd_own", "kl_tf", "kl_own", "wall_time_s"):
            cells.append(mean_std([r[key] for r in rows]) if key in rows[0] else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

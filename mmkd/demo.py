"""The offline demo behind ``mmkd demo``: tiny LLaVA-KD against the same student trained without a teacher.

Setting (what a user of distillation has in practice, scaled down to minutes on two CPU cores):

* a synthetic ScienceQA-style world (``mmkd.data.synth``) with fixed option lists (``fixed_options=True``: each
  family always shows the same options in the same order, so a letter is a fixed function of the content); its
  test split is held out from everything;
* both vision towers are random CLIP-ViTs kept frozen (a fixed random feature map; their image processors centre
  the white background on 0): only projectors and language models train. Trained from scratch, the towers
  collapsed to image-independent tokens within a few hundred steps (docs/results.md);
* a tiny teacher trained with labels on a large ``teacher`` split (``recipes/tiny/teacher.yaml``);
* the student gets a small ``labelled`` set (a subset of the teacher's split, true answers) and a larger,
  disjoint ``transfer`` set *without* answers: the teacher answers those questions (its own most likely
  option letter), and only that answer and the teacher's distributions ever reach the student;
* tiny LLaVA-KD as the demo measures it (``recipes/tiny/demo_kd.yaml``: DPT with MDist + RDist on the transfer
  prompts, SFT on the labelled set, DFT with LM + MDist + RDist on both) against the baseline
  ``recipes/tiny/demo_no_kd.yaml``: the same student, initial weights, stages, optimizer, schedule, batch and
  optimizer steps, LM loss only, on the labelled set (without a teacher the transfer set has no answers to learn
  from);
* teacher, distilled student and baseline are scored on the test split by ``mmkd eval`` in both modes:
  generation scored by LLaVA's ScienceQA rules (the headline) and option likelihood.

Layout of ``OUT`` (default ``runs/demo``): ``world/`` (the world with its ground truth), ``models/`` (random
initial parts), ``student_data/`` (labelled answers + teacher answers; images link to ``world/images``),
``teacher/``, ``kd/``, ``no_kd/`` (run directories), ``eval/`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SIZES", "demo_command", "recipe_path", "results_table"]

# Model sizes: ~3x the student's parameters for the teacher. Measured on the shared 2-core machine (docs/results.md):
# at batch 16 and ~80-token sequences with frozen towers a teacher step takes 0.08-0.55 s depending on the load.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 384, "vision_hidden": 64,
                "vision_layers": 2},
    "student": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 192, "vision_hidden": 32,
                "vision_layers": 1},
}
IMAGE_SIZE = 32  # the world's images and both vision towers (16 visual tokens of 8x8 patches)
HEADLINE = "generate"
MODELS = ("teacher", "student_kd", "student_no_kd")


def recipe_path(name: str) -> Path:
    """``recipes/tiny/NAME.yaml`` of the source tree (the demo runs from a clone, ``pip install -e .``)."""
    path = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's recipe is missing (expected a clone of mmkd with recipes/tiny/)")
    return path


def _split_world(world: Path, n_labelled: int, n_transfer: int, seed: int) -> dict[str, list[str]]:
    """Add ``teacher``, ``labelled`` and ``transfer`` splits to the world's ``pid_splits.json``.

    Every non-test problem is drawn into either the teacher's split or the transfer pool (disjoint);
    ``labelled`` is a subset of the teacher's split. ``test`` is left exactly as the world wrote it.
    """
    splits = json.loads((world / "pid_splits.json").read_text())
    pool = sorted(splits["train"] + splits["val"], key=int)
    if n_transfer + n_labelled > len(pool):
        raise ValueError(f"demo: transfer={n_transfer} + labelled={n_labelled} exceed the {len(pool)} non-test "
                         "problems of the world (expected a larger n)")
    random.Random(seed + 7).shuffle(pool)
    transfer, teacher = pool[:n_transfer], pool[n_transfer:]
    labelled = teacher[:n_labelled]
    splits.update(teacher=sorted(teacher, key=int), labelled=sorted(labelled, key=int),
                  transfer=sorted(transfer, key=int))
    (world / "pid_splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    return splits


def _write_student_data(world: Path, out: Path, splits: dict[str, list[str]], teacher_answers: dict[str, str]) -> dict:
    """The student's data: labelled problems with their answers, transfer problems with the teacher's answers.

    Transfer problems lose their ``solution`` (it states the answer); images are a link to the world's.
    Returns counts, including how often the teacher's answer is right (for the setting; never used in training).
    """
    from mmkd.data.scienceqa import letters

    problems = json.loads((world / "problems.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    mine: dict[str, Any] = {pid: problems[pid] for pid in splits["labelled"]}
    right = 0
    for pid in splits["transfer"]:
        p = dict(problems[pid])
        index = letters(len(p["choices"])).index(teacher_answers[pid])
        right += index == p["answer"]
        p.update(answer=index, solution="", answer_source="teacher")
        mine[pid] = p
    (out / "problems.json").write_text(json.dumps(mine, indent=1) + "\n")
    dft = sorted(splits["labelled"] + splits["transfer"], key=int)
    (out / "pid_splits.json").write_text(json.dumps(
        {"labelled": splits["labelled"], "transfer": splits["transfer"], "dft": dft}, indent=1) + "\n")
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    os.symlink(os.path.relpath(world / "images", out), link)
    n = len(splits["transfer"])
    return {"labelled": len(splits["labelled"]), "transfer": n,
            "teacher_answer_accuracy_on_transfer": round(100.0 * right / max(1, n), 2)}


def _teacher_answers(answers: Path) -> dict[str, str]:
    out = {}
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        out[str(row["question_id"])] = row["text"]
    return out


def _fit(name: str, out: Path, overrides: dict[str, Any], echo) -> dict[str, Any]:
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import run_recipe

    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    recipe = load_recipe(recipe_path(name), args)
    return run_recipe(recipe, echo=echo)


def _evaluate(model: str, world: Path, split: str, out: Path, mode: str, batch_size: int,
              stage: str | None = None) -> dict[str, Any]:
    from mmkd.train.evaluate import evaluate_command

    return evaluate_command(model, f"sqa:{world}", split=split, out=str(out), batch_size=batch_size,
                            max_new_tokens=6, mode=mode, stage=stage)


def _by_skill(world: Path, answers: Path) -> dict[str, dict[str, Any]]:
    """Accuracy per question family of the world (its ``skill``), from an answer file and the true answers."""
    from mmkd.data.scienceqa import letters
    from mmkd.eval.parsing import parse_answer

    problems = json.loads((world / "problems.json").read_text())
    table: dict[str, dict[str, Any]] = {}
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        p = problems[str(row["question_id"])]
        letter = parse_answer(row["text"])
        right = letter is not None and letter in letters(len(p["choices"])) and \
            letters(len(p["choices"])).index(letter) == p["answer"]
        entry = table.setdefault(p["skill"], {"correct": 0, "count": 0})
        entry["correct"] += int(right)
        entry["count"] += 1
    for entry in table.values():
        entry["accuracy"] = 100.0 * entry["correct"] / entry["count"]
    return dict(sorted(table.items()))


def results_table(results: dict[str, Any]) -> str:
    """The demo's table as text: one row per model, overall and per-category accuracy in both modes."""
    cats = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
    lines = []
    for mode in ("generate", "likelihood"):
        tag = " (headline)" if mode == HEADLINE else ""
        lines.append(f"test accuracy, {mode}{tag}")
        lines.append(f"{'model':15s} {'all':>6s} " + " ".join(f"{c:>6s}" for c in cats))
        for name in MODELS:
            m = results[name][mode]
            row = [f"{m['accuracy']:6.2f}"]
            for c in cats:
                acc = m["categories"].get(c, {}).get("accuracy")
                row.append(f"{acc:6.2f}" if acc is not None else f"{'-':>6s}")
            lines.append(f"{name:15s} " + " ".join(row))
        lines.append("")
    return "\n".join(lines)


def demo_command(
    out: str = "runs/demo",
    seed: int = 0,
    n: int = 2400,
    labelled: int = 120,
    transfer: int = 1000,
    teacher_steps: int = 1000,
    dpt_steps: int = 100,
    sft_steps: int = 50,
    dft_steps: int = 450,
    batch: int = 16,
    lr: float = 1e-3,
    eval_batch_size: int = 64,
    teacher_sizes: dict[str, int] | None = None,
    student_sizes: dict[str, int] | None = None,
    fresh: bool = True,
    fixed_options: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Run the offline demo: tiny LLaVA-KD vs. the same student without distillation, on a synthetic world.

    Generates a synthetic ScienceQA-style world, trains a tiny teacher on a labelled split, lets it answer a
    transfer set the student has no answers for, runs tiny LLaVA-KD (DPT -> SFT -> DFT with MDist/RDist) and the
    no-distillation baseline (same student, labelled data and optimizer steps), evaluates the three models on the
    held-out test split in generate mode (LLaVA's ScienceQA scoring, the headline) and likelihood mode, prints the
    table and writes OUT/results.json. About 3 minutes on 2 CPU cores (more when the CPU is shared);
    see docs/results.md.

    Args:
        out: Output folder (world, models, run directories, evaluations, results.json).
        seed: Seed of the world, the splits, every initialisation and the data order.
        n: Problems in the synthetic world (20% test, held out from all training).
        labelled: Problems the student has answers for (a subset of the teacher's split).
        transfer: Problems the student sees without answers (the teacher answers them); disjoint from the
            teacher's split.
        teacher_steps: Optimizer steps of the teacher's training.
        dpt_steps: Optimizer steps of the DPT stage (and of the baseline's first stage).
        sft_steps: Optimizer steps of the SFT stage (and of the baseline's second stage).
        dft_steps: Optimizer steps of the DFT stage (and of the baseline's third stage).
        batch: Global batch size of every stage.
        lr: Peak learning rate of every stage.
        eval_batch_size: Questions per evaluation batch.
        teacher_sizes: Overrides of the teacher's sizes (keys of ``mmkd.models.presets.build_tiny``).
        student_sizes: Overrides of the student's sizes.
        fresh: Delete OUT's earlier demo folders first (otherwise finished stages are reused, as ``mmkd fit`` does).
        fixed_options: World whose families always show the same options in the same order (docs/data.md), so a
            letter is a fixed function of the content; off: the default world (a tiny teacher stays at chance).
        threads: Torch intra-op threads while the demo runs (restored afterwards). One is the default: on a shared
            2-core machine two threads made a teacher step 10-25x slower (3.5 s vs 0.14-0.31 s, docs/results.md).

    Returns:
        The content of results.json.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads={threads}: expected at least 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(out, seed, n, labelled, transfer, teacher_steps, dpt_steps, sft_steps, dft_steps, batch, lr,
                     eval_batch_size, teacher_sizes, student_sizes, fresh, fixed_options)
    finally:
        torch.set_num_threads(previous)


def _demo(out: str, seed: int, n: int, labelled: int, transfer: int, teacher_steps: int, dpt_steps: int,
          sft_steps: int, dft_steps: int, batch: int, lr: float, eval_batch_size: int,
          teacher_sizes: dict[str, int] | None, student_sizes: dict[str, int] | None, fresh: bool,
          fixed_options: bool) -> dict[str, Any]:
    import torch

    from mmkd.data.synth import synth_sqa
    from mmkd.models.presets import PRESET_SIZES, write_vision_and_lm

    start = time.perf_counter()
    root = Path(out)
    timings: dict[str, float] = {}

    def echo(message: str) -> None:
        print(f"[demo {time.perf_counter() - start:6.1f}s] {message}", flush=True)

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    if fresh:
        for sub in ("world", "models", "student_data", "teacher", "kd", "no_kd", "eval", "results.json"):
            path = root / sub
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
    world, models, student_data = root / "world", root / "models", root / "student_data"
    sizes = {"teacher": {**DEFAULT_SIZES["teacher"], **(teacher_sizes or {})},
             "student": {**DEFAULT_SIZES["student"], **(student_sizes or {})}}

    t0 = time.perf_counter()
    echo(f"writing the synthetic world ({n} problems) and random initial models")
    summary = synth_sqa(world, n, seed, IMAGE_SIZE, fixed_options=fixed_options)
    splits = _split_world(world, labelled, transfer, seed)
    tokenizer = str(world / "tokenizer")
    for offset, kind in enumerate(("teacher", "student")):
        if not (models / f"{kind}-lm" / "config.json").is_file():
            import tempfile

            torch.manual_seed(seed * 100 + offset)
            with tempfile.TemporaryDirectory(prefix="mmkd-demo-") as tmp:
                vision, lm = write_vision_and_lm(Path(tmp), tokenizer, {**PRESET_SIZES["mllm-student"], **sizes[kind]})
                for src, dst in ((vision, models / f"{kind}-vision"), (lm, models / f"{kind}-lm")):
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(src, dst)
            _white_background_processor(models / f"{kind}-vision", IMAGE_SIZE)
    lap("world_and_models", t0)

    common = {"seed": seed, "demo_root": str(root), "batch": batch, "lr": lr}
    t0 = time.perf_counter()
    echo("training the teacher (recipes/tiny/teacher.yaml)")
    _fit("teacher", root, {**common, "run_dir": root / "teacher", "teacher_steps": teacher_steps}, echo)
    lap("teacher_fit", t0)

    t0 = time.perf_counter()
    echo("the teacher answers the transfer set (option likelihood); the student gets only those answers")
    _evaluate(str(root / "teacher"), world, "transfer", root / "eval" / "teacher" / "transfer-likelihood",
              "likelihood", eval_batch_size)
    answers = _teacher_answers(root / "eval" / "teacher" / "transfer-likelihood" / "answers.jsonl")
    data_counts = _write_student_data(world, student_data, splits, answers)
    lap("teacher_labels_transfer", t0)

    steps = {"dpt_steps": dpt_steps, "sft_steps": sft_steps, "dft_steps": dft_steps}
    t0 = time.perf_counter()
    echo("tiny LLaVA-KD: DPT -> SFT -> DFT (recipes/tiny/demo_kd.yaml)")
    _fit("demo_kd", root, {**common, **steps, "run_dir": root / "kd"}, echo)
    lap("student_kd_fit", t0)
    t0 = time.perf_counter()
    echo("baseline without distillation (recipes/tiny/demo_no_kd.yaml)")
    _fit("demo_no_kd", root, {**common, **steps, "run_dir": root / "no_kd"}, echo)
    lap("student_no_kd_fit", t0)

    results: dict[str, Any] = {}
    runs = {"teacher": root / "teacher", "student_kd": root / "kd", "student_no_kd": root / "no_kd"}
    for name, run in runs.items():
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        skills: dict[str, Any] = {}
        for mode in ("generate", "likelihood"):
            echo(f"evaluating {name} on the test split ({mode})")
            where = root / "eval" / name / f"test-{mode}"
            entry[mode] = _evaluate(str(run), world, "test", where, mode, eval_batch_size)
            skills[mode] = _by_skill(world, where / "answers.jsonl")
            _copy_into_run(where, run, f"test-{mode}")
        entry["headline"] = HEADLINE
        entry["skills"] = skills
        entry["parameters"] = _count_parameters(run)
        results[name] = entry
        lap(f"eval_{name}", t0)

    timings["total"] = round(time.perf_counter() - start, 1)
    results["setting"] = {
        "headline": f"{HEADLINE} accuracy (%) on the held-out test split, scored by LLaVA's ScienceQA rules; "
                    "likelihood accuracy is reported next to it",
        "seed": seed,
        "world": {"problems": n, "test": summary["test"]["problems"], "teacher_split": len(splits["teacher"]),
                  **data_counts},
        "steps": {"teacher": teacher_steps, **{k.removesuffix("_steps"): v for k, v in steps.items()},
                  "student_total": dpt_steps + sft_steps + dft_steps},
        "batch": batch,
        "lr": lr,
        "examples_per_student": batch * (dpt_steps + sft_steps + dft_steps),
        "sizes": sizes,
        "recipes": {"teacher": "recipes/tiny/teacher.yaml", "student_kd": "recipes/tiny/demo_kd.yaml",
                    "student_no_kd": "recipes/tiny/demo_no_kd.yaml"},
        "world_options": "fixed_options" if fixed_options else "default",
        "trained_parts": ["projector", "language_model"],
        "objectives": {"dpt": "mdist + rdist on transfer prompts", "sft": "lm on labelled",
                       "dft": "lm + mdist + rdist on labelled + teacher-answered transfer",
                       "baseline": "lm on labelled in every stage"},
        "threads": torch.get_num_threads(),
        "seconds": timings,
    }
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from mmkd.report import write_report

    page = write_report(list(runs.values()), out=root / "report", names=list(runs))
    print()
    print(results_table(results))
    print(f"report of the three models: {page}")
    print(f"wrote {root / 'results.json'} in {timings['total']:.0f} s")
    return results


def _copy_into_run(evaluation: Path, run: Path, folder: str) -> None:
    """The demo's evaluation of a run, also where ``mmkd report`` reads a run's evaluations
    (``RUN/eval/<last stage>/<split>-<mode>/``)."""
    manifest = json.loads((run / "manifest.json").read_text())
    last = list(manifest["stages"])[-1]
    target = run / "eval" / last / folder
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(evaluation, target)


def _white_background_processor(folder: Path, image_size: int) -> None:
    """Save a CLIP image processor into a vision folder that maps the world's white background to 0.

    With CLIP's default normalisation every patch of these mostly white images starts from the same large vector,
    the shapes' colours are a few percent of it, and training from scratch collapsed the visual tokens to one
    image-independent vector (the answer logits moved by 1e-4 when images were swapped). Centring on white keeps
    the background at 0, so what a patch holds is what the tower sees. Both models get the same processor.
    """
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[1.0, 1.0, 1.0],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)


def _count_parameters(run: Path) -> int:
    from safetensors import safe_open

    manifest = json.loads((run / "manifest.json").read_text())
    last = [e for e in manifest["stages"].values() if e.get("status") == "done"][-1]
    total = 0
    for file in (run / last["student"]).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                total += _prod(f.get_slice(key).get_shape())
    return total


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out

"""What an on-policy step costs: generation, teacher scoring and the update, for recipes/tiny/gkd.yaml's GKD stage.

The stage is built as ``mmkd fit`` builds it (its collator, task, objectives and student parts), from the demo's
models (``--demo-root``, a finished ``mmkd demo``) and a student folder (``--student``: default the demo's distilled
student, whose answers end after a letter as a trained student's do; ``recipe`` takes the recipe's random initial
student, whose answers run to the length limit). Each measured micro-batch is timed in three parts:

* generation: the student answers the batch's prompts (``generate``, sampling at the stage's settings; eval mode);
* teacher scoring: the teacher's forward on its own inputs of the student's answers (teacher-forced batches: on the
  data's answers);
* update: the student's forward, the objectives, backward and an AdamW step.

A teacher-forced micro-batch (lam = 0) has no generation. With lam = 0.5, an optimizer step costs on average the
teacher-forced time plus half the generation time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/on_policy.py --demo-root runs/demo     # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-root", default="runs/demo")
    parser.add_argument("--student", default=None, help="student folder, or 'recipe' (default: the demo's KD student)")
    parser.add_argument("--batches", type=int, default=20, help="micro-batches measured per mode (after 3 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from mmkd.models import LlavaModel
    from mmkd.tasks.sequences import answer_batch, trim_answers
    from mmkd.train.recipe import load_recipe
    from mmkd.train.stage import align_vocabularies, build_task_for

    demo = Path(args.demo_root)
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "gkd.yaml", ["--demo_root", str(demo)])
    spec = recipe.stage("dft")
    teacher = recipe.teacher.build().freeze()
    folder = args.student or str(demo / "kd" / "stages" / "dft" / "student")
    student = recipe.student.build() if folder == "recipe" else LlavaModel(folder)
    align_vocabularies(student, teacher)
    data = spec.data.build()
    task = build_task_for(spec, student, teacher, spec.total_steps(len(data)))
    task.bind_weights(spec.weights)
    collate = task.collator(student, teacher, spec.max_length)
    parts = student.parts()
    student.requires_grad_(False)
    params = [p for name in spec.train for p in parts[name]]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    size = spec.micro_batch_size
    print(f"stage dft of recipes/tiny/gkd.yaml: micro-batch {size}, generation {task.generation}, student {folder}, "
          f"{args.threads} thread(s)")

    results = {}
    for mode in ("teacher-forced", "on-policy"):
        rows = []
        for i in range(args.batches + 3):
            idx = order[(i * size) % len(order):][:size]
            batch = collate([data[j] for j in idx])
            t0 = time.perf_counter()
            gen_len = 0.0
            if mode == "on-policy":
                student.eval()
                with torch.no_grad():
                    generated = student.generate(batch.prompt, **task.generation)
                student.train()
                answers = trim_answers(generated, student.end_token_ids)
                batch, counts = answer_batch(batch, answers, student.tokenizer.pad_token_id, task.max_length,
                                             teacher.tokenizer.pad_token_id)
                gen_len = counts["gen_length"]
            t1 = time.perf_counter()
            with torch.no_grad():
                teacher_out = teacher(**batch.teacher_side()[0].kwargs())
            t2 = time.perf_counter()
            student_out = student(**batch.inputs.kwargs())
            terms = task.token_terms(student_out, teacher_out, batch)
            loss = sum(spec.weights[n] * terms[n] for n in spec.weights) + terms.get("_head_gradient", 0.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i >= 3:
                rows.append((t1 - t0, t2 - t1, t3 - t2, gen_len))
        results[mode] = [statistics.mean(c) for c in zip(*rows)]

    header = f"{'micro-batch':16s} {'generation':>11s} {'teacher':>9s} {'update':>9s} {'total':>9s}"
    print(f"\n{header} {'answer tokens':>14s}")
    for mode, (g, t, u, n) in results.items():
        print(f"{mode:16s} {g * 1e3:9.1f}ms {t * 1e3:7.1f}ms {u * 1e3:7.1f}ms {(g + t + u) * 1e3:7.1f}ms "
              f"{n:14.2f}")
    tf, op = (sum(results[m][:3]) for m in ("teacher-forced", "on-policy"))
    print(f"on-policy / teacher-forced micro-batch time: {op / tf:.2f}x; at lam = 0.5 an optimizer step costs "
          f"{(tf + op) / 2 / tf:.2f}x a teacher-forced one")


if __name__ == "__main__":
    main()

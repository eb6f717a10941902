"""The teacher cache end to end at a realistic vocabulary (V = 151,936), on CPU: bytes, write throughput, step rates.

1. Codec (bench/cache_codec.py's tables at --codec-tokens positions per case): bytes per stored token and per (id,
   log-prob) entry at k = 16, 64, 128 on teacher-like distributions over 151,936 ids, and the relative error of the
   top-k KL read back from the cache against the uncompressed top-k.
2. The synthetic ScienceQA world with its tokenizer's vocabulary filled to 151,936 entries (unreachable filler
   entries: the text tokenizes as before, but every logit row, top-k and stored id spans the full vocabulary), a
   random LLaVA-class teacher and a smaller random MLLM student sized so that a teacher forward costs at least 4x a
   student forward (measured here on the same batches, printed as the compute ratio):
   * ``mmkd cache`` of the DFT stage (in process, packed codec, k = 64): records/s, tokens/s, bytes per answer token;
   * three stages run side by side in one process, the same student, data, batch and steps: plain SFT (``lm``), DFT
     from the cache (``lm + topk_kl``, no teacher loaded) and DFT with the live teacher (``lm + topk_kl``, the
     teacher's top-k computed each step); step rate = 1 / median of the logged ``perf/step_time_s`` (steps after
     the first five).

    OMP_NUM_THREADS=2 .venv/bin/python bench/cache.py                  # about 8 minutes on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/cache.py --shape head --codec-tokens 0   # the head-dominated student
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cache_codec  # noqa: E402

V = 151_936
# Default shapes: a student whose transformer body costs several times its LM head per step, as a real student's
# does (Qwen2-0.5B: 360M body parameters against a 136M head that runs only at answer positions), and a teacher about
# 5x its compute. ``--shape head`` gives a 2-layer, 128-wide student whose head over 151,936 ids dominates the step.
SHAPES = {
    "body": ({"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 8, "intermediate": 2816, "vision_hidden": 64},
             {"hidden": 512, "layers": 6, "heads": 8, "kv_heads": 4, "intermediate": 1408, "vision_hidden": 48}),
    "head": ({"hidden": 512, "layers": 6, "heads": 8, "kv_heads": 4, "intermediate": 1536, "vision_hidden": 64},
             {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256, "vision_hidden": 48}),
}


def fill_vocabulary(folder: Path, size: int) -> int:
    """Add unreachable entries to a byte-level BPE tokenizer's vocabulary until it holds ``size`` tokens."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    i, next_id = 0, 0
    while len(taken) < size:
        while next_id in taken:
            next_id += 1
        vocab[f"<filler{i}>"] = next_id
        taken.add(next_id)
        i += 1
    path.write_text(json.dumps(data, ensure_ascii=False))
    return len(taken)


def build_world(root: Path, problems: int, seed: int, shape: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    from mmkd.data.synth import synth_sqa
    from mmkd.models.presets import build_tiny

    sqa = root / "sqa"
    synth_sqa(sqa, problems, seed, 32)
    tok = sqa / "tokenizer"
    fill_vocabulary(tok, V)
    assert len(AutoTokenizer.from_pretrained(tok)) == V
    teacher_sizes, student_sizes = SHAPES[shape]
    teacher = build_tiny("llava-teacher", str(root / "teacher"), tokenizer=str(tok), seed=seed, **teacher_sizes)
    student = build_tiny("mllm-student", str(root / "student"), tokenizer=str(tok), seed=seed + 1, **student_sizes)
    return {"sqa": str(sqa), "teacher": str(teacher), "student": str(student)}


def recipe_text(paths: dict[str, str], run_dir: Path, cache: Path, steps: int, batch: int) -> str:
    stage = """
    data: {{class_path: mmkd.data.ScienceQA, init_args: {{root: "{sqa}", split: train}}}}
    train: [projector, language_model]
    objectives: {objectives}
    task_args: {task_args}
    init_from: recipe
    optimizer: {{lr: 1.0e-4}}
    schedule: {{warmup_steps: 1}}
    batch_size: {batch}
    max_length: 256"""
    stages = {
        "sft": ("{lm: 1.0}", "{}"),
        "dft_cached": ("{lm: 1.0, topk_kl: 1.0}", f"{{teacher_cache: {cache}}}"),
        "dft_live": ("{lm: 1.0, topk_kl: 1.0}", "{}"),
    }
    body = "".join(f"\n  {name}:" + stage.format(sqa=paths["sqa"], objectives=o, task_args=a, batch=batch)
                   for name, (o, a) in stages.items())
    return f"""seed: 0
run_dir: {run_dir}
teacher:
  class_path: mmkd.models.LlavaModel
  init_args: {{path: "{paths['teacher']}"}}
student:
  class_path: mmkd.models.LlavaModel
  init_args: {{path: "{paths['student']}"}}
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {steps}
  checkpoint_every_n_steps: 100000
  log_every_n_steps: 1
  enable_progress_bar: false
stages:{body}
"""


def compute_ratio(paths: dict[str, str], batch: int, repeats: int = 5) -> tuple[float, float, float]:
    """Median forward time of the teacher and of the student on the same batches, and their ratio."""
    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.models import LlavaModel

    teacher, student = LlavaModel(paths["teacher"]).eval(), LlavaModel(paths["student"]).eval()
    data = ScienceQA(paths["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=256)
    times = {"teacher": [], "student": []}
    with torch.no_grad():
        for r in range(repeats + 1):
            collated = collate([data[(r * batch + i) % len(data)] for i in range(batch)])
            for name, model in (("teacher", teacher), ("student", student)):
                inputs = collated.teacher_side()[0] if name == "teacher" else collated.inputs
                t0 = time.perf_counter()
                model(**inputs.kwargs())
                if r:
                    times[name].append(time.perf_counter() - t0)
    t, s = statistics.median(times["teacher"]), statistics.median(times["student"])
    return t, s, t / s


def step_rate(run_dir: Path, stage: str, skip: int = 5) -> float:
    rows = list(csv.DictReader((run_dir / "stages" / stage / "logs" / "metrics.csv").open()))
    times = [float(r["perf/step_time_s"]) for r in rows if r.get("perf/step_time_s")][skip:]
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per stage")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="body", help="model shapes (see SHAPES)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--problems", type=int, default=480, help="problems in the synthetic world")
    parser.add_argument("--codec-tokens", type=int, default=512, help="positions per codec case (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=str, default=None, help="keep the world, cache and runs in this folder")
    args = parser.parse_args()

    if args.codec_tokens:
        print(f"== 1. codec at V = {V:,} (bench/cache_codec.py, {args.codec_tokens} positions per case)", flush=True)
        cache_codec.report(args.codec_tokens, args.seed)

    from mmkd.train.cache import cache_stage
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import run_recipe

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmkd-cache-e2e-"))
    try:
        t0 = time.perf_counter()
        paths = build_world(root / "world", args.problems, args.seed, args.shape)
        teacher_sizes, student_sizes = SHAPES[args.shape]
        print(f"\n== 2. synthetic world, V = {V:,}: {args.problems} problems, built in "
              f"{time.perf_counter() - t0:.0f} s; shape {args.shape}: teacher {teacher_sizes}, student "
              f"{student_sizes}", flush=True)
        teacher_t, student_t, ratio = compute_ratio(paths, args.batch)
        print(f"forward of a batch of {args.batch}: teacher {teacher_t * 1e3:.0f} ms, student {student_t * 1e3:.0f} "
              f"ms: compute ratio {ratio:.1f}", flush=True)
        recipe_path = root / "recipe.yaml"
        cache = root / "cache"
        recipe_path.write_text(recipe_text(paths, root / "run", cache, args.steps, args.batch))
        recipe = load_recipe(recipe_path)
        t0 = time.perf_counter()
        summary = cache_stage(recipe, "dft_cached", echo=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t0
        records = summary["records"]
        tokens = _train_tokens(recipe)
        print(f"mmkd cache: {records} records ({tokens:,} tokens through the teacher) in {wall:.1f} s wall "
              f"(teacher and data loading included): {records / wall:.1f} records/s, {tokens / wall:,.0f} tokens/s; "
              f"{summary['bytes']:,} bytes = {summary['bytes_per_position']:.1f} B per answer token at k = 64",
              flush=True)
        run_recipe(recipe, echo=lambda m: None)
        rates = {name: step_rate(root / "run", name) for name in ("sft", "dft_cached", "dft_live")}
        print(f"\nstep rate (steps/s, batch {args.batch}, median of steps 6-{args.steps}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
        print(f"DFT from the cache / SFT: {rates['dft_cached'] / rates['sft']:.2f}x (goal >= 0.9)")
        print(f"DFT from the cache / DFT with the live teacher: {rates['dft_cached'] / rates['dft_live']:.2f}x "
              f"at compute ratio {ratio:.1f} (goal >= 1.8 at >= 4)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _train_tokens(recipe) -> int:
    """Tokens of the teacher's sequences over the cached stage's data (what the teacher read)."""
    from mmkd.data import MultimodalCollator
    from mmkd.models import ImageTextInputs

    spec = recipe.stage("dft_cached")
    view = ImageTextInputs.from_pretrained(recipe.teacher.init_args["path"])
    collate = MultimodalCollator.for_models(view, view, max_length=spec.max_length)
    data = spec.data.build()
    return sum(len(collate.encode(data[i])["student"].input_ids) for i in range(len(data)))


if __name__ == "__main__":
    main()

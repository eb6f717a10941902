"""Tokens/s and peak memory per GPU of a LLaVA-KD stage under one DeepSpeed preset, in bf16.

Two configurations, one ``GPU_CHECK`` JSON line each run:

* tiny (``--root``): the debug recipe's distillation stage with LLaVA-KD's objectives (LM + MDist + RDist), a tiny
  LLaVA-class teacher distilled into a tiny MLLM student on the synthetic ScienceQA world;
* real size (``--real-size DIR``, a folder written by ``bench/real_size.py --build-only --out DIR``): one stage of
  recipes/llava_kd_onevision.yaml (default DFT: LM + MDist + RDist, the LLM and projector training) with the real
  SigLIP-so400m + Qwen2.5-0.5B student and a LLaVA-OneVision-Qwen2-0.5B-shaped teacher, ~2,048-token samples,
  ``--micro-batch`` samples per GPU, started from the recipe's student (``init_from: recipe``).

Called by bench/gpu_check.sh; Lightning starts the other ranks by re-executing this file.

    python bench/gpu_check.py --root DATA_ROOT --run-dir DIR --strategy deepspeed_stage_3 --devices 1
    python bench/gpu_check.py --real-size REAL_DIR --stage dft --run-dir DIR --strategy deepspeed_stage_2 --devices 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class Throughput(L.Callback):
    """Student tokens (attention mask) per second after ``warmup`` optimizer steps, and peak memory per rank."""

    def __init__(self, warmup: int, case: dict | None = None):
        self.warmup, self.tokens, self.t0 = warmup, 0, None
        self.case = case or {"case": "tiny"}
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None and trainer.global_step >= self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.tokens += int(batch.inputs.attention_mask.sum())
            self.samples += int(batch.size)

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - (self.t0 or time.perf_counter())
        device = pl_module.device
        tokens = trainer.strategy.reduce(torch.tensor(float(self.tokens), device=device), reduce_op="sum")
        samples = trainer.strategy.reduce(torch.tensor(float(self.samples), device=device), reduce_op="sum")
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30],
                            device=device)
        peaks = trainer.strategy.all_gather(peak).reshape(-1, 2).tolist()
        if trainer.is_global_zero:
            print("GPU_CHECK " + json.dumps({
                **self.case, "strategy": trainer.strategy.__class__.__name__, "zero_stage": trainer.strategy.config[
                    "zero_optimization"]["stage"], "world": trainer.world_size, "card": torch.cuda.get_device_name(),
                "steps_timed": trainer.global_step - self.warmup, "tokens_per_s": round(float(tokens) / elapsed, 1),
                "tokens_per_sample": round(float(tokens) / max(1.0, float(samples)), 1),
                "step_time_s": round(elapsed / max(1, trainer.global_step - self.warmup), 3),
                "peak_allocated_gib": [round(a, 3) for a, _ in peaks],
                "peak_reserved_gib": [round(r, 3) for _, r in peaks]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="tiny assets (mmkd data tiny-assets --out DIR)")
    parser.add_argument("--real-size", default=None, help="real-size folders (bench/real_size.py --build-only --out)")
    parser.add_argument("--stage", default="dft", help="the real-size recipe's stage to run")
    parser.add_argument("--micro-batch", type=int, default=1, help="real size: samples per GPU per micro-batch")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--strategy", default="deepspeed_stage_2")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    args = parser.parse_args()

    from mmkd.train.recipe import load_recipe
    from mmkd.train.rundir import RunDir
    from mmkd.train.runner import Runner
    from mmkd.train.stage import build_stage

    if args.real_size:
        sys.path.insert(0, str(Path(__file__).parent))
        from real_size import RECIPE, recipe_overrides

        stage, real = args.stage, Path(args.real_size)
        overrides = recipe_overrides(real, stage, args.steps, args.strategy, accelerator="gpu", devices=args.devices)
        overrides[overrides.index("--run_dir") + 1] = args.run_dir
        overrides += [f"--stages.{stage}.init_from", "recipe", f"--stages.{stage}.micro_batch_size",
                      str(args.micro_batch), f"--stages.{stage}.batch_size", str(args.micro_batch * args.devices)]
        recipe = load_recipe(RECIPE, overrides)
        case = {"case": "real-size", "stage": stage, "micro_batch": args.micro_batch}
    else:
        stage, case = "distill", {"case": "tiny"}
        recipe = load_recipe(ROOT / "recipes" / "debug.yaml", [
            "--data_root", args.root, "--run_dir", args.run_dir, "--trainer.accelerator", "gpu",
            "--trainer.devices", str(args.devices), "--trainer.strategy", args.strategy, "--trainer.precision",
            "bf16-mixed", "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
            "--trainer.checkpoint_every_n_steps", str(10 * args.steps), "--stages.distill.batch_size",
            str(args.batch_size), "--stages.distill.objectives", json.dumps({"lm": 1.0, "mdist": 1.0, "rdist": 1.0})])
    runner = Runner(recipe, echo=lambda _: None)
    spec = recipe.stage(stage)
    teacher = runner.teachers.get() if spec.needs_teacher else None
    trainer, module, datamodule = build_stage(spec, runner.build_student(stage), teacher, RunDir(args.run_dir),
                                              on_saved=lambda *_: None, echo=lambda _: None)
    trainer.callbacks.append(Throughput(args.warmup, case))
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main()

"""Tokens/s and peak memory per GPU of a tiny LLaVA-KD stage under one DeepSpeed preset, in bf16.

The debug recipe's distillation stage with LLaVA-KD's objectives (LM + MDist + RDist): a tiny LLaVA-class
teacher distilled into a tiny MLLM student on the synthetic ScienceQA world. Called by bench/gpu_check.sh;
Lightning starts the other ranks by re-executing this file.

    python bench/gpu_check.py --root DATA_ROOT --run-dir DIR --strategy deepspeed_stage_3 --devices 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class Throughput(L.Callback):
    """Student tokens (attention mask) per second after ``warmup`` optimizer steps, and peak memory per rank."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.t0 = warmup, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None and trainer.global_step >= self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - (self.t0 or time.perf_counter())
        device = pl_module.device
        tokens = trainer.strategy.reduce(torch.tensor(float(self.tokens), device=device), reduce_op="sum")
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30],
                            device=device)
        peaks = trainer.strategy.all_gather(peak).reshape(-1, 2).tolist()
        if trainer.is_global_zero:
            print("GPU_CHECK " + json.dumps({
                "strategy": trainer.strategy.__class__.__name__, "zero_stage": trainer.strategy.config[
                    "zero_optimization"]["stage"], "world": trainer.world_size, "card": torch.cuda.get_device_name(),
                "steps_timed": trainer.global_step - self.warmup, "tokens_per_s": round(float(tokens) / elapsed, 1),
                "peak_allocated_gib": [round(a, 3) for a, _ in peaks],
                "peak_reserved_gib": [round(r, 3) for _, r in peaks]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="tiny assets (mmkd data tiny-assets --out DIR)")
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

    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", [
        "--data_root", args.root, "--run_dir", args.run_dir, "--trainer.accelerator", "gpu",
        "--trainer.devices", str(args.devices), "--trainer.strategy", args.strategy, "--trainer.precision",
        "bf16-mixed", "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
        "--trainer.checkpoint_every_n_steps", str(10 * args.steps), "--stages.distill.batch_size", str(args.batch_size),
        "--stages.distill.objectives", json.dumps({"lm": 1.0, "mdist": 1.0, "rdist": 1.0})])
    runner = Runner(recipe, echo=lambda _: None)
    trainer, module, datamodule = build_stage(recipe.stage("distill"), runner.build_student("distill"),
                                              runner.teachers.get(), RunDir(args.run_dir), on_saved=lambda *_: None,
                                              echo=lambda _: None)
    trainer.callbacks.append(Throughput(args.warmup))
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main()

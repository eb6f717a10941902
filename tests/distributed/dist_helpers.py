"""Helpers of the distributed tests: multi-process runs of recipes/debug.yaml on the CPU.

Each run is a real ``mmkd fit`` (Lightning re-executes the command for the second rank; DeepSpeed runs on its CPU
accelerator over gloo). The stage is the recipe's distillation stage (teacher in the loop) on the caption pairs,
where every sample has an image, with a micro-batch of 1: one process (8 micro-batches accumulated) and two
processes (4 each) then compute the same objective, the mean of per-sample losses over the same 8 samples, so
their results must agree up to float summation order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug.yaml"
STEPS = 3


def caption_data(root: str) -> str:
    return json.dumps({"class_path": "mmkd.data.CaptionPairs",
                       "init_args": {"json_path": f"{root}/sqa/captions.json", "image_folder": f"{root}/sqa/images"}})


def fit_args(run_dir: Path, assets: dict, devices: int = 2, strategy: str = "ddp", *extra: str,
             data: str | None = None) -> list[str]:
    return ["fit", str(RECIPE), "--run-dir", str(run_dir), "--data_root", assets["root"], "--stage", "distill",
            "--stages.distill.data", data or caption_data(assets["root"]), "--stages.distill.micro_batch_size", "1",
            "--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false",
            "--trainer.devices", str(devices), "--trainer.strategy", strategy, *extra]


def run_env(zero_config: Path | None = None, fault: str | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("MMKD_FAULT", "MMKD_DEEPSPEED_CONFIG", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    if fault:
        env["MMKD_FAULT"] = fault
    if zero_config:
        env["MMKD_DEEPSPEED_CONFIG"] = str(zero_config)
    return env


def fit(run_dir: Path, assets: dict, devices: int = 2, strategy: str = "ddp", *extra: str,
        zero_config: Path | None = None, fault: str | None = None, data: str | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmkd", *fit_args(run_dir, assets, devices, strategy, *extra, data=data)]
    return subprocess.run(cmd, env=run_env(zero_config, fault), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def student(run_dir: Path, stage: str = "distill") -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "stages" / stage / "student").glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no student weights in {run_dir}"
    return out


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())

"""A tiny recipe whose stages read the teacher from a cache, for the ``mmkd cache`` tests (written into tmp folders)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(path: Path, assets: dict, *, cache: str | None, steps: int = 3, batch: int = 4, micro: int = 1,
                 k: int | None = None, split: str = "train", on_missing: str = "error", teacher: str | None = None,
                 preference: bool = False, sqa_root: str | None = None) -> Path:
    """recipes/debug.yaml's distillation stage with ``lm + topk_kl`` (or a DPO stage against the teacher), reading
    the teacher from ``cache`` (None: the live teacher)."""
    root = assets["root"]
    task_args = f"{{teacher_cache: {cache}, on_missing: {on_missing}}}" if cache else "{}"
    topk_args = f"objective_args: {{topk_kl: {{k: {k}}}}}" if k is not None else ""
    if preference:
        stage = f"""
  dft:
    task: preference
    data: {{class_path: mmkd.data.PreferencePairs, init_args: {{json_path: "{root}/sqa/preference.json",
            image_folder: "{root}/sqa/images"}}}}
    train: [projector, language_model]
    objectives: {{dpo: 1.0}}
    task_args: {task_args if cache else "{reference: teacher}"}
    optimizer: {{lr: 1.0e-3}}
    schedule: {{warmup_steps: 1}}
    batch_size: {batch}
    micro_batch_size: {micro}
    max_length: 160
"""
    else:
        stage = f"""
  dft:
    data: {{class_path: mmkd.data.ScienceQA, init_args: {{root: "{sqa_root or root + '/sqa'}", split: {split}}}}}
    train: [projector, language_model]
    objectives: {{lm: 1.0, topk_kl: 1.0}}
    {topk_args}
    task_args: {task_args}
    optimizer: {{lr: 1.0e-3}}
    schedule: {{warmup_steps: 1}}
    batch_size: {batch}
    micro_batch_size: {micro}
    max_length: 160
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""seed: 0
run_dir: {path.parent / "run"}
teacher:
  class_path: mmkd.models.LlavaModel
  init_args: {{path: "{teacher or assets['teacher']}"}}
student:
  class_path: mmkd.models.MLLMStudent
  init_args: {{vision: "{assets['student_vision']}", language_model: "{assets['student_lm']}",
              tokenizer: "{assets['tokenizer']}"}}
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {steps}
  checkpoint_every_n_steps: 100
  log_every_n_steps: 1
  enable_progress_bar: false
stages:{stage}""")
    return path


def mmkd(*args: str, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("MMKD_FAULT", "MMKD_CACHE_FAULT", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    if fault:
        env["MMKD_CACHE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mmkd", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)

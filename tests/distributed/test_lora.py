"""LoRA students on two CPU processes: DDP and ZeRO-2 train what one process trains (the merged student folders agree
up to float summation order)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_lora_resume import LORA, STEPS, fit, manifest, student_tensors  # noqa: E402

# Micro-batches of one sample (one process accumulates 4, two processes 2 each: the same mean), and adapters without
# dropout (each rank draws its own dropout masks, so with dropout the runs differ by design).
TRANSFORM = ('{"class_path": "mmkd.models.LoRA", "init_args": {"r": 8, "alpha": 16, "dropout": 0.0, '
             '"target_modules": "all-linear", "parts": ["language_model"]}}')
MICRO = ["--stages.dpt.micro_batch_size", "1", "--stages.sft.micro_batch_size", "1",
         "--stages.dft.micro_batch_size", "1", "--stages.sft.student_transform", TRANSFORM,
         "--stages.dft.student_transform", TRANSFORM]


@pytest.fixture(scope="module")
def one_process(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora-1") / "run"
    proc = fit(LORA, run, tiny_assets, *MICRO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow)])
def test_two_processes_train_what_one_trains(strategy, one_process, tiny_assets, tmp_path):
    run = tmp_path / "run"
    proc = fit(LORA, run, tiny_assets, *MICRO, "--trainer.devices", "2", "--trainer.strategy", strategy)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [(s, e["global_step"]) for s, e in manifest(run)["stages"].items()] == list(STEPS.items())
    ours, ref = student_tensors(run), student_tensors(one_process)
    assert ours.keys() == ref.keys()
    start = student_tensors(one_process, "dpt")
    moved = max(float((ref[k].float() - start[k].float()).abs().max()) for k in ref if k in start)
    assert moved > 1e-3  # the LoRA stages trained (merged into the folder's weights)
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, worst
